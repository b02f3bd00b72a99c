"""Trigger survival: how much of a backdoor's trigger the model actually sees in training (issue 17).

An image augmentation (RoCLIP's crops and flips, docs/roclip-spec.md §1.8) can cut a patch away or
move it away from where evaluation puts it, which would explain a defense's low ASR without any
merit of its own. ``TriggerSurvival`` watches the poisoned training views as the trainer makes
them (``train.train(view_probe=...)``), reading the augmentation's own parameters of that step:

- patch triggers: a view keeps the **whole patch** when the centres of the patch's four corner
  pixels, mapped by the view's geometric transform (kornia's ``transform_matrix``: flips, crops,
  resizes composed), all fall inside the view (the centres of its first and last pixels, with
  1e-4 px of slack for rounding); it shows the patch **as evaluated** when, besides, each mapped
  corner lies within ``tol`` px of where the evaluation geometry (``preprocess.eval_geometry``)
  puts it: same position, scale and orientation (a mirrored patch is another pattern);
- every trigger: the Pearson correlation between the view's **trigger residual** (the view minus
  the same augmentation, same parameters, replayed on the clean source image) and the evaluated
  residual (the poisoned image minus its clean source, both at the evaluation geometry); a view
  whose residual is constant (the trigger was cut away entirely) counts as 0.

A step without augmentation shows the evaluated pixels: every count is then exact (1.0).
Replaying draws no random number, so watching changes nothing in training (tests/test_survival.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .preprocess import eval_geometry

@dataclass
class TriggerViews:
    """What an attack tells the survival probe about its poisoned training pairs
    (``attacks.base.Attack.trigger_views``).

    Attributes:
        rows: int64 [P], the poisoned pairs' rows in the training set the model sees
            (``PoisonPlan.train``), ascending.
        clean: uint8 [P, 3, H, W], each poisoned image's clean source at the stored geometry.
        boxes: int64 [P, 4], the patch of each poisoned image as (top, left, bottom, right) in
            stored pixels, bottom and right exclusive; None for a whole-image trigger.
    """

    rows: torch.Tensor
    clean: torch.Tensor
    boxes: Optional[torch.Tensor] = None

    def __post_init__(self):
        p = len(self.rows)
        if len(self.clean) != p or (self.boxes is not None and tuple(self.boxes.shape) != (p, 4)):
            raise ValueError(f"trigger views: {p} rows, {len(self.clean)} clean images, boxes "
                             f"{None if self.boxes is None else tuple(self.boxes.shape)}; expected one of each per row")
        if self.rows.dtype != torch.int64 or self.clean.dtype != torch.uint8 or self.clean.dim() != 4:
            raise ValueError(f"trigger views: rows must be int64 and clean images uint8 [P, 3, H, W], got "
                             f"{self.rows.dtype} and {self.clean.dtype} {tuple(self.clean.shape)}")
        if self.boxes is not None and p:
            h, w = self.clean.shape[-2:]
            t, l, b, r = self.boxes.unbind(1)
            if not bool(((0 <= t) & (t < b) & (b <= h) & (0 <= l) & (l < r) & (r <= w)).all()):
                raise ValueError(f"trigger views: every patch box (top, left, bottom, right) must lie inside the "
                                 f"{h}x{w} image with top < bottom and left < right")


def corner_centres(boxes: torch.Tensor) -> torch.Tensor:
    """float [P, 4, 2] (x, y): centres of the top-left, top-right, bottom-right, bottom-left
    pixels of each (top, left, bottom, right) box (exclusive ends)."""
    t, l, b, r = boxes.double().unbind(1)
    xs = torch.stack([l, r - 1, r - 1, l], dim=1)
    ys = torch.stack([t, t, b - 1, b - 1], dim=1)
    return torch.stack([xs, ys], dim=2)


def map_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Points float [P, K, 2] (x, y) mapped by homographies float [P, 3, 3] -> float [P, K, 2]."""
    h = torch.cat([points, torch.ones_like(points[..., :1])], dim=2) @ matrix.double().transpose(1, 2)
    return h[..., :2] / h[..., 2:]


def patch_survival(matrix: torch.Tensor, boxes: torch.Tensor, stored: int, size: int,
                   tol: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole patch in view, patch as evaluated): bool [P] each, for views made by homographies
    ``matrix`` float [P, 3, 3] (stored pixel coordinates -> view pixel coordinates) from square
    stored images of side ``stored``, views of side ``size``, patches ``boxes`` int64 [P, 4]
    (the module docstring). ``tol`` in view pixels."""
    corners = corner_centres(boxes)
    mapped = map_points(matrix, corners)
    eps = 1e-4
    present = ((mapped >= -eps) & (mapped <= size - 1 + eps)).all(dim=2).all(dim=1)
    evaluated = (corners + 0.5) * size / stored - 0.5
    at_eval = present & ((mapped - evaluated).abs() <= tol).all(dim=2).all(dim=1)
    return present, at_eval


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of float [P, ...] tensors -> float [P]; 0 where either row is
    constant."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    r = torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))
    return r.clamp(-1.0, 1.0)  # rounding can step past 1 for identical rows


def replay(transform, params: list, images: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """``transform`` (a kornia ``AugmentationSequential``) applied to ``images`` float [K, 3, H, W]
    with the parameters ``params`` (its ``_params`` after a forward pass over ``batch`` images)
    of the batch positions ``index`` int64 [K]: the views those positions got, for other pixels.
    Draws no random number."""
    sliced = []
    for item in params:
        data = {}
        for k, v in (item.data or {}).items():
            if k == "forward_input_shape":
                v = torch.tensor([len(index), *v[1:].tolist()])
            elif k != "order" and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
                v = v[index.to(v.device)]
            data[k] = v
        sliced.append(type(item)(item.name, data))
    return transform(images, params=sliced)


class TriggerSurvival:
    """Counts over the poisoned training views the trainer makes (a ``view_probe`` for
    ``train.train``), per epoch: ``take_epoch()`` returns and resets them.

    Args:
        views: the attack's ``TriggerViews``.
        n_train: rows of the training set ``views.rows`` index into.
        tol: px of the view within which a patch corner counts as at its evaluated position.
        index: int64 [M], the rows of that set the trainer is given (a data filter's kept pairs:
            the trainer's row i is ``index[i]``); default all of them.
    """

    def __init__(self, views: TriggerViews, n_train: int, tol: float = 0.5, index: torch.Tensor | None = None):
        self.views, self.tol = views, tol
        self.slot = torch.full((n_train,), -1, dtype=torch.int64)
        self.slot[views.rows] = torch.arange(len(views.rows))
        if index is not None:
            self.slot = self.slot[index]
        self.off = False  # set when the augmentation's parameters cannot be read
        self._reset()

    def _reset(self) -> None:
        self.n, self.present, self.at_eval, self.corr = 0, 0, 0, 0.0

    def sync(self) -> None:
        """At the end of an epoch, on every rank of a process group: sum the epoch's counts over
        the ranks (each watched its own slice of the batches) into rank 0's, which ``take_epoch``
        then reports; the other ranks start the next epoch from zero. One process: nothing."""
        from . import distributed

        if distributed.world_size() == 1:
            return
        total = torch.tensor([self.n, self.present, self.at_eval, self.corr], dtype=torch.float64)
        distributed.all_reduce_sum_(total)
        self._reset()
        if distributed.is_main():
            self.n, self.present, self.at_eval = (int(round(v)) for v in total[:3].tolist())
            self.corr = float(total[3])

    @staticmethod
    def watchable(transform) -> bool:
        """True when the survival of ``transform``'s views can be read: no augmentation, or a
        kornia ``AugmentationSequential`` (its ``transform_matrix`` and per-step ``_params``). Any
        other augmentation function trains as it is, unwatched."""
        if transform is None:
            return True
        params = getattr(transform, "_params", None)
        return (hasattr(transform, "transform_matrix") and isinstance(params, list)
                and all(hasattr(p, "data") and hasattr(p, "name") for p in params))

    def __call__(self, rows: torch.Tensor, inputs: torch.Tensor, views: torch.Tensor, transform) -> None:
        """Watch one step: ``rows`` int64 [B] training rows, ``inputs`` uint8 [B, 3, H, W] (stored
        geometry), ``views`` [B, 3, S, S] what the model got (float in [0, 1] after ``transform``,
        or uint8 at the evaluation geometry when ``transform`` is None)."""
        slots = self.slot[rows.cpu()]
        pos = (slots >= 0).nonzero().squeeze(1)
        if len(pos) == 0 or self.off:
            return
        if not self.watchable(transform):
            self.off = True  # an augmentation whose parameters cannot be read: no survival columns
            warnings.warn("the defense's image augmentation is not a kornia AugmentationSequential: trigger "
                          "survival is not measured for this cell")
            return
        k, size, stored = slots[pos], views.shape[-1], inputs.shape[-1]
        clean = self.views.clean[k]
        device = views.device
        if transform is None:
            seen = views[pos.to(device)].float().cpu() / 255
            clean_view = eval_geometry(clean, size).float() / 255
            scale = size / stored  # the evaluation geometry: a resize, nothing cropped from a square
            matrix = torch.zeros(len(pos), 3, 3, dtype=torch.float64)
            matrix[:, 0, 0] = matrix[:, 1, 1] = scale
            matrix[:, :2, 2] = 0.5 * scale - 0.5
            matrix[:, 2, 2] = 1.0
        else:
            matrix = transform.transform_matrix[pos.to(device)].cpu()  # before the replay overwrites it
            seen = views[pos.to(device)].float().cpu()
            clean_view = replay(transform, transform._params, clean.to(device).float() / 255, pos,
                                len(rows)).float().cpu()
        evaluated = (eval_geometry(inputs[pos.cpu()].cpu(), size).float() - eval_geometry(clean, size).float()) / 255
        self.corr += float(pearson(seen - clean_view, evaluated).sum())
        if self.views.boxes is not None:
            present, at_eval = patch_survival(matrix, self.views.boxes[k], stored, size, self.tol)
            self.present += int(present.sum())
            self.at_eval += int(at_eval.sum())
        self.n += len(pos)

    def take_epoch(self) -> dict[str, float]:
        """This epoch's counts, then reset: ``trig_n`` (poisoned views watched),
        ``trig_present`` / ``trig_at_eval`` (views with the whole patch / the patch as evaluated;
        patch triggers only) and ``trig_corr_sum`` (summed residual correlations); nothing when
        the augmentation could not be watched."""
        if self.off:
            return {}
        out = {"trig_n": self.n, "trig_corr_sum": self.corr}
        if self.views.boxes is not None:
            out.update(trig_present=self.present, trig_at_eval=self.at_eval)
        self._reset()
        return out


def survival_columns(history: list[dict]) -> dict[str, float | int]:
    """The row's survival columns from the per-epoch records of ``TriggerSurvival.take_epoch``
    (in ``history``): ``trig_n`` (int), ``trig_present``, ``trig_at_eval`` (fractions of the
    views, patch triggers only) and ``trig_corr`` (mean residual correlation, in [-1, 1]); nothing
    when no poisoned view was watched."""
    n = sum(int(h.get("trig_n", 0)) for h in history)
    if n == 0:
        return {}
    corr = min(1.0, max(-1.0, sum(h["trig_corr_sum"] for h in history) / n))  # a mean of values in [-1, 1]
    out: dict[str, float | int] = {"trig_n": n, "trig_corr": corr}
    if any("trig_present" in h for h in history):
        out["trig_present"] = sum(h.get("trig_present", 0) for h in history) / n
        out["trig_at_eval"] = sum(h.get("trig_at_eval", 0) for h in history) / n
    return out
