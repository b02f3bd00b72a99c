"""Detection metrics of data filters against brute-force definitions on small hand-made examples."""
import itertools
import math

import numpy as np
import pytest
import torch

from poisonbench.detection import detection_metrics


def brute_auroc(pos, neg):
    """P(poison scores above clean) + 1/2 P(tie), over all (poison, clean) pairs."""
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def brute_ap(pos, neg):
    """Mean over poisons of the precision among the pairs scoring at least as high as it."""
    def precision(s):
        return sum(p >= s for p in pos) / (sum(p >= s for p in pos) + sum(n >= s for n in neg))
    return sum(precision(p) for p in pos) / len(pos)


def brute_roc(pos, neg):
    """ROC vertices (FPR, TPR) flagging every pair scoring >= t, t from +inf down over the scores."""
    pts = [(0.0, 0.0)]
    for t in sorted(set(pos) | set(neg), reverse=True):
        pts.append((sum(n >= t for n in neg) / len(neg), sum(p >= t for p in pos) / len(pos)))
    return pts


def brute_tpr_at(pos, neg, x):
    """The ROC curve's TPR at FPR x: the top of a vertical segment at x, else the straight line
    between the two vertices around x."""
    pts = brute_roc(pos, neg)
    at = [t for f, t in pts if f == x]
    if at:
        return max(at)
    for (f0, t0), (f1, t1) in zip(pts, pts[1:]):
        if f0 < x < f1:
            return t0 + (t1 - t0) * (x - f0) / (f1 - f0)
    raise AssertionError("x outside the curve")


def brute_fpr_at(pos, neg, y):
    """The ROC curve's lowest FPR at TPR y, interpolated linearly between vertices."""
    pts = brute_roc(pos, neg)
    at = [f for f, t in pts if t == y]
    if at:
        return min(at)
    for (f0, t0), (f1, t1) in zip(pts, pts[1:]):
        if t0 < y < t1:
            return f0 + (f1 - f0) * (y - t0) / (t1 - t0)
    raise AssertionError("y outside the curve")


def metrics(pos, neg, kept=None):
    scores = torch.tensor(list(pos) + list(neg), dtype=torch.float32)
    flags = torch.tensor([True] * len(pos) + [False] * len(neg))
    return detection_metrics(scores, flags, torch.ones(len(scores), dtype=torch.bool) if kept is None else kept)


def check_against_brute_force(pos, neg):
    m = metrics(pos, neg)
    # float32 scores in the tensor: compare with the same rounding
    pos, neg = [float(np.float32(p)) for p in pos], [float(np.float32(n)) for n in neg]
    assert m["det_auroc"] == pytest.approx(brute_auroc(pos, neg), abs=1e-12)
    assert m["det_ap"] == pytest.approx(brute_ap(pos, neg), abs=1e-12)
    assert m["det_tpr_at_1fpr"] == pytest.approx(brute_tpr_at(pos, neg, 0.01), abs=1e-12)
    assert m["det_tpr_at_5fpr"] == pytest.approx(brute_tpr_at(pos, neg, 0.05), abs=1e-12)
    assert m["det_fpr_at_95tpr"] == pytest.approx(brute_fpr_at(pos, neg, 0.95), abs=1e-12)
    return m


def test_perfect_separation():
    m = check_against_brute_force([5, 6, 7], [1, 2, 3, 4])
    assert (m["det_auroc"], m["det_ap"], m["det_tpr_at_1fpr"], m["det_tpr_at_5fpr"]) == (1.0, 1.0, 1.0, 1.0)
    assert m["det_fpr_at_95tpr"] == 0.0
    assert m["det_roc_fpr"][0] == 0.0 and m["det_roc_tpr"][0] == 0.0
    assert m["det_roc_fpr"][-1] == 1.0 and m["det_roc_tpr"][-1] == 1.0


def test_reversed_scores():
    m = check_against_brute_force([1, 2, 3], [4, 5, 6, 7])
    assert (m["det_auroc"], m["det_tpr_at_1fpr"], m["det_tpr_at_5fpr"]) == (0.0, 0.0, 0.0)
    assert m["det_fpr_at_95tpr"] == 1.0


def test_all_tied_is_chance():
    m = check_against_brute_force([3.0] * 5, [3.0] * 20)
    assert m["det_auroc"] == 0.5 and m["det_ap"] == pytest.approx(5 / 25)
    assert m["det_tpr_at_1fpr"] == pytest.approx(0.01) and m["det_fpr_at_95tpr"] == pytest.approx(0.95)


def test_partial_ties_and_mixed_order():
    check_against_brute_force([0.9, 0.8, 0.8, 0.3, 0.1], [0.8, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05])


def test_exact_threshold_takes_the_top_of_the_vertical_step():
    # 100 clean pairs; 4 poisons above all of them, 4 just below the top clean pair, 2 low.
    neg = [i / 100 for i in range(100)]
    pos = [2.0] * 4 + [0.985] * 4 + [0.005] * 2
    m = check_against_brute_force(pos, neg)
    # the threshold at the top clean pair has FPR exactly 1/100: TPR 4/10 there, then 8/10 at the
    # next threshold with the same FPR; 1 % FPR reaches 8 of 10 poisons
    assert m["det_tpr_at_1fpr"] == pytest.approx(0.8)


def test_inexact_threshold_interpolates_linearly():
    # 50 clean pairs (FPR steps of 2 %): 2 poisons on top, then 2 poisons tied with 1 clean pair:
    # the ROC curve goes straight from (0, 0.5) to (0.02, 1.0)
    pos, neg = [9.0, 9.0, 5.0, 5.0], [5.0] + [float(i) / 100 for i in range(49)]
    m = check_against_brute_force(pos, neg)
    assert m["det_tpr_at_1fpr"] == pytest.approx(0.75)
    assert m["det_fpr_at_95tpr"] == pytest.approx(0.02 * 0.45 / 0.5)
    assert m["det_tpr_at_5fpr"] == 1.0


def test_counts_of_removed_pairs():
    pos, neg = [5.0, 4.0, 0.5], [3.0, 2.0, 1.0, 0.0]
    kept = torch.tensor([False, True, False, False, True, True, False])  # drops 2 poisons and 2 clean pairs
    m = metrics(pos, neg, kept)
    assert m["det_poisons_removed"] == 2 and m["det_clean_removed"] == 2
    assert m["det_n_poison"] == 3 and m["det_n"] == 7
    assert all(isinstance(m[k], int) for k in ("det_poisons_removed", "det_clean_removed", "det_n_poison", "det_n"))


@pytest.mark.parametrize("pos,neg", [([], [1.0, 2.0]), ([1.0, 2.0], [])])
def test_one_class_only_gives_nan_not_an_error(pos, neg):
    m = metrics(pos, neg)
    for k in ("det_auroc", "det_ap", "det_tpr_at_1fpr", "det_tpr_at_5fpr", "det_fpr_at_95tpr"):
        assert math.isnan(m[k]), k
    assert m["det_roc_fpr"] == [] and m["det_roc_tpr"] == []
    assert m["det_n_poison"] == len(pos) and m["det_poisons_removed"] == 0


def test_non_finite_scores_are_refused_with_their_count():
    scores = torch.tensor([0.1, float("nan"), float("inf"), 0.3])
    flags = torch.tensor([True, False, False, False])
    with pytest.raises(ValueError, match="2 of 4 scores are NaN or infinite"):
        detection_metrics(scores, flags, torch.ones(4, dtype=torch.bool))


def test_malformed_inputs_are_refused():
    ones = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="one length"):
        detection_metrics(torch.zeros(3), ones, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_poison must be a bool"):
        detection_metrics(torch.zeros(3), torch.ones(3), ones)


def test_the_stored_roc_curve_is_short_and_follows_the_curve():
    g = torch.Generator().manual_seed(0)
    flags = torch.zeros(5000, dtype=torch.bool)
    flags[:250] = True
    scores = torch.randn(5000, generator=g) + 2.0 * flags
    m = detection_metrics(scores, flags, torch.ones(5000, dtype=torch.bool))
    fpr, tpr = np.array(m["det_roc_fpr"]), np.array(m["det_roc_tpr"])
    assert len(fpr) <= 102 and len(fpr) == len(tpr)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    # the sampled curve is the curve: its area is the AUROC up to the sampling of 1 % FPR steps
    assert np.trapezoid(tpr, fpr) == pytest.approx(m["det_auroc"], abs=0.01)
    assert np.interp(0.05, fpr, tpr) == pytest.approx(m["det_tpr_at_5fpr"], abs=1e-9)
