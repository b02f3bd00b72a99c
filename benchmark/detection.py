"""Detection metrics of a data filter: how well its per-pair scores find the poisoned pairs.

Poisons are the positive class and a higher score means more suspicious (docs/DESIGN.md,
"Detection metrics"; Huang et al., ICLR 2025, Appendix B.7 as summarised in
shared/reference/spec-badclip-density-detection.md §B.7 and B.11.15). The runner stores the dict
returned by ``detection_metrics`` as the ``det_*`` columns of a filter cell's row.
"""
from __future__ import annotations

import math

import numpy as np
import torch

ROC_POINTS = 101  # the stored ROC curve: exact when it has at most this many vertices, else sampled


def _interp_up(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """The largest y of the piecewise-linear curve through the points (x, y) at x == ``at``.

    ``x`` and ``y`` are non-decreasing (an ROC curve in the order of decreasing threshold), so a
    vertical segment at ``at`` (several points with that x) counts with its top; between two
    vertices the curve is the straight line joining them."""
    i = int(np.searchsorted(x, at, side="right")) - 1  # the last vertex with x <= at
    if i < 0:
        return float(y[0])
    if x[i] == at or i == len(x) - 1:
        return float(y[i])
    # x[i] < at < x[i + 1], and i + 1 is the first vertex at its x (the bottom of a vertical segment)
    return float(y[i] + (y[i + 1] - y[i]) * (at - x[i]) / (x[i + 1] - x[i]))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    """TPR of the ROC curve (``fpr``, ``tpr`` from ``sklearn.metrics.roc_curve``) at FPR ``at``.

    Linear interpolation between the curve's vertices when no threshold lands exactly on ``at``
    (the rule of spec B.11.15 for FPR at 95 % TPR, mirrored); at an exact threshold where several
    thresholds share that FPR, the highest TPR (the best a threshold with FPR <= ``at`` gets)."""
    return _interp_up(np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float), at)


def fpr_at_tpr(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    """FPR of the ROC curve at TPR ``at``: the lowest FPR at which the curve reaches TPR ``at``,
    interpolated linearly between vertices when no threshold lands exactly on it (spec B.11.15)."""
    # the lowest x at y == at is minus the largest (-x) on the mirrored curve, read from the other end
    f, t = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    return -_interp_up(-t[::-1], -f[::-1], -at)


def roc_points(fpr: np.ndarray, tpr: np.ndarray, points: int = ROC_POINTS) -> tuple[list[float], list[float]]:
    """The ROC curve for plots, at most ``points`` + 1 vertices: the vertices themselves when there
    are at most ``points`` (pass ``roc_curve(..., drop_intermediate=True)``'s), else the curve
    sampled at ``points`` evenly spaced FPRs in [0, 1] with ``tpr_at_fpr``, preceded by the origin."""
    f, t = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    if len(f) <= points:
        return [float(v) for v in f], [float(v) for v in t]
    grid = np.linspace(0.0, 1.0, points)
    ys = [tpr_at_fpr(f, t, float(x)) for x in grid]
    return [0.0] + [float(x) for x in grid], [0.0] + ys


def detection_metrics(scores: torch.Tensor, is_poison: torch.Tensor, kept: torch.Tensor) -> dict:
    """Detection metrics of a data filter's scores against the manifest's poison flags.

    Args:
        scores: float [N], one per training pair; higher = more suspicious. Every score must be
            finite.
        is_poison: bool [N], True for the pairs the attack poisoned (``CaptionDataset.is_poison``).
        kept: bool [N], True for the pairs the filter kept (``DataFilter.keep``).

    Returns a dict of plain Python numbers and lists (the ``det_*`` columns of a filter cell):

    - ``det_auroc``: area under the ROC curve (``sklearn.metrics.roc_auc_score``; ties count one
      half), poisons as label 1 (spec B.11.15); 1 = every poison scores above every clean pair.
    - ``det_ap``: average precision (``sklearn.metrics.average_precision_score``: the mean over
      poisons of the precision at the threshold of its score, no interpolation).
    - ``det_tpr_at_1fpr``, ``det_tpr_at_5fpr``: the fraction of poisons found at 1 % and 5 % of
      clean pairs flagged, read off the ROC curve with linear interpolation between vertices when
      no threshold lands exactly there (the rule that spec B.11.15 gives for FPR at 95 % TPR), and
      the highest TPR at that FPR when one does (``tpr_at_fpr``).
    - ``det_fpr_at_95tpr``: the fraction of clean pairs flagged when 95 % of poisons are
      (spec B.7), interpolated likewise (``fpr_at_tpr``).
    - ``det_poisons_removed``, ``det_clean_removed`` (int): poisoned / clean pairs not kept.
    - ``det_n_poison``, ``det_n`` (int): poisoned pairs, all pairs.
    - ``det_roc_fpr``, ``det_roc_tpr``: the ROC curve for plots, at most ``ROC_POINTS`` + 1
      points from (0, 0) to (1, 1) (``roc_points``).

    The fractions are in [0, 1]. With no poisoned pair or no clean pair the ROC curve is undefined:
    the five fractions are NaN and the curve lists are empty (no exception; the counts are still
    given).

    Raises:
        ValueError: when the three are not 1-D tensors of one length, when ``is_poison`` or
            ``kept`` is not bool, or when some scores are NaN or infinite (saying how many; a
            filter must map them to finite values first, e.g. spec B.11.13).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    for name, t in (("scores", scores), ("is_poison", is_poison), ("kept", kept)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"detection_metrics: {name} must be a 1-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (len(scores) == len(is_poison) == len(kept)):
        raise ValueError(f"detection_metrics: scores, is_poison and kept must have one length, got "
                         f"{len(scores)}, {len(is_poison)} and {len(kept)}")
    for name, t in (("is_poison", is_poison), ("kept", kept)):
        if t.dtype != torch.bool:
            raise ValueError(f"detection_metrics: {name} must be a bool tensor, got {t.dtype}")
    if not torch.is_floating_point(scores):
        raise ValueError(f"detection_metrics: scores must be a float tensor, got {scores.dtype}")
    s = scores.detach().cpu().double().numpy()
    y = is_poison.detach().cpu().numpy()
    k = kept.detach().cpu().numpy()
    bad = int((~np.isfinite(s)).sum())
    if bad:
        raise ValueError(f"detection_metrics: {bad} of {len(s)} scores are NaN or infinite; the filter "
                         "must give every pair a finite score")
    n_poison = int(y.sum())
    out = {"det_auroc": math.nan, "det_ap": math.nan, "det_tpr_at_1fpr": math.nan, "det_tpr_at_5fpr": math.nan,
           "det_fpr_at_95tpr": math.nan,
           "det_poisons_removed": int((y & ~k).sum()), "det_clean_removed": int((~y & ~k).sum()),
           "det_n_poison": n_poison, "det_n": int(len(s)), "det_roc_fpr": [], "det_roc_tpr": []}
    if n_poison == 0 or n_poison == len(s):
        return out
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    out["det_auroc"] = float(roc_auc_score(y, s))
    out["det_ap"] = float(average_precision_score(y, s))
    out["det_tpr_at_1fpr"] = tpr_at_fpr(fpr, tpr, 0.01)
    out["det_tpr_at_5fpr"] = tpr_at_fpr(fpr, tpr, 0.05)
    out["det_fpr_at_95tpr"] = fpr_at_tpr(fpr, tpr, 0.95)
    out["det_roc_fpr"], out["det_roc_tpr"] = roc_points(*roc_curve(y, s, drop_intermediate=True)[:2])
    return out


def mean_roc(curves: list[tuple[list[float], list[float]]], points: int = ROC_POINTS) -> tuple[list[float], list[float]]:
    """The mean of several ROC curves (seeds of one setting), each a pair (FPR list, TPR list) as
    ``detection_metrics`` stores them: one curve is returned as it is; several are averaged
    vertically (Fawcett 2006, §7.1): their TPRs at ``points`` evenly spaced FPRs in [0, 1]
    (``tpr_at_fpr``), preceded by the origin. ValueError when ``curves`` is empty."""
    if not curves:
        raise ValueError("mean_roc: no curve to average")
    if len(curves) == 1:
        f, t = curves[0]
        return [float(v) for v in f], [float(v) for v in t]
    grid = np.linspace(0.0, 1.0, points)
    ys = np.mean([[tpr_at_fpr(f, t, float(x)) for x in grid] for f, t in curves], axis=0)
    return [0.0] + [float(x) for x in grid], [0.0] + [float(y) for y in ys]
