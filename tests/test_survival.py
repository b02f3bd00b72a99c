"""Trigger survival (poisonbench.survival): counts read from the augmentation's own parameters
equal a brute-force count over the same crops and flips; watching changes nothing in training."""
import dataclasses

import pytest
import torch

from poisonbench.augment import image_augmentation
from poisonbench.config import resolve
from poisonbench.models import create_model
from poisonbench.runner import prepare
from poisonbench.survival import TriggerSurvival, TriggerViews, pearson
from poisonbench.train import train
from poisonbench.utils import derive_seed


def brute_force(box, flip: bool, src: torch.Tensor, side: int, size: int, tol: float = 0.5):
    """(whole patch in the view, patch as evaluated) of one view, by slicing a mask of the patch
    the way the view was cut: flipped, then the crop's pixel rows and columns (inclusive corners)."""
    top, left, bottom, right = box
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    if flip:
        mask = mask.flip(1)
    (x0, y0), (x1, y1) = src[0].round().long().tolist(), src[2].round().long().tolist()
    present = int(mask[y0:y1 + 1, x0:x1 + 1].sum()) == (bottom - top) * (right - left)
    if not present:
        return False, False
    # where the crop puts the patch's corner pixels, against where evaluation puts them (S == side here)
    cols = torch.nonzero(mask.any(0)).squeeze(1)
    rows = torch.nonzero(mask.any(1)).squeeze(1)
    sx, sy = (size - 1) / (x1 - x0), (size - 1) / (y1 - y0)
    view_l, view_r = (cols[0] - x0) * sx, (cols[-1] - x0) * sx
    view_t, view_b = (rows[0] - y0) * sy, (rows[-1] - y0) * sy
    if flip:  # the patch's left edge in the image is its right edge in the view
        view_l, view_r = view_r, view_l
    at_eval = all(abs(float(v) - e) <= tol for v, e in
                  ((view_l, left), (view_r, right - 1), (view_t, top), (view_b, bottom - 1)))
    return True, at_eval


@pytest.mark.parametrize("min_crop", [0.08, 0.9])
def test_survival_equals_brute_force_count_over_the_crops_and_flips_actually_drawn(min_crop):
    side = 28
    g = torch.Generator().manual_seed(1)
    n = 400
    boxes = []
    for _ in range(n):
        s = int(torch.randint(2, 9, (1,), generator=g))
        top, left = (int(v) for v in torch.randint(0, side - s + 1, (2,), generator=g))
        boxes.append([top, left, top + s, left + s])
    boxes = torch.tensor(boxes)
    clean = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    poisoned = clean.clone()
    for i, (t, l, b, r) in enumerate(boxes.tolist()):
        poisoned[i, :, t:b, l:r] = torch.randint(0, 256, (3, b - t, r - l), generator=g, dtype=torch.uint8)
    probe = TriggerSurvival(TriggerViews(torch.arange(n), clean, boxes), n)
    aug = image_augmentation(side, min_crop)
    torch.manual_seed(0)
    views = aug(poisoned.float() / 255)
    flips = aug._params[0].data["batch_prob"].bool()
    srcs = aug._params[1].data["src"]
    probe(torch.arange(n), poisoned, views, aug)
    counts = probe.take_epoch()
    expected = [brute_force(boxes[i].tolist(), bool(flips[i]), srcs[i], side, side) for i in range(n)]
    assert counts["trig_n"] == n
    assert counts["trig_present"] == sum(p for p, _ in expected)
    assert counts["trig_at_eval"] == sum(a for _, a in expected)
    assert 0 < counts["trig_present"] < n  # the test exercises both outcomes
    if min_crop == 0.9:
        assert counts["trig_at_eval"] > 0


def test_without_augmentation_every_view_is_the_evaluated_trigger():
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 256, (6, 3, 28, 28), generator=g, dtype=torch.uint8)
    poisoned = clean.clone()
    poisoned[:, :, 20:24, 20:24] = 255
    probe = TriggerSurvival(TriggerViews(torch.tensor([1, 3, 5]), clean[[1, 3, 5]],
                                         torch.tensor([[20, 20, 24, 24]] * 3)), 6)
    probe(torch.arange(6), poisoned, poisoned, None)  # the view is the stored image (S == stored side)
    counts = probe.take_epoch()
    assert counts == {"trig_n": 3, "trig_corr_sum": pytest.approx(3.0), "trig_present": 3, "trig_at_eval": 3}
    assert probe.take_epoch()["trig_n"] == 0  # reset after each epoch


def test_a_cut_away_trigger_correlates_zero_and_pearson_is_the_reference_formula():
    a, b = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    for i in range(5):
        ref = torch.corrcoef(torch.stack([a[i].flatten(), b[i].flatten()]))[0, 1]
        assert pearson(a, b)[i].item() == pytest.approx(ref.item(), abs=1e-12)
    assert pearson(torch.zeros(2, 8), torch.randn(2, 8)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("attack,params", [("badnet", {}), ("badnet", {"location": "random", "pattern": "fresh"}),
                                           ("badnet-lc", {"n_poison": 20, "location": "random"}), ("badclip", {})])
def test_patch_boxes_hold_every_pixel_the_trigger_changed(attack, params):
    cell = prepare(resolve(attack, "clip", "tiny", attack_params=params))
    views = cell.attack.trigger_views(cell.data, cell.plan)
    poisoned = cell.plan.train.images[views.rows]
    assert len(views.rows) == cell.plan.n_poison and views.boxes is not None
    inside = torch.zeros_like(poisoned, dtype=torch.bool)
    for i, (t, l, b, r) in enumerate(views.boxes.tolist()):
        inside[i, :, t:b, l:r] = True
    changed = poisoned != views.clean
    assert not (changed & ~inside).any()  # nothing changed outside the box
    assert changed.flatten(1).any(1).all()  # and every poisoned image was changed inside it


def test_whole_image_triggers_have_no_box_and_targeted_poisoning_no_views():
    cell = prepare(resolve("blended", "clip", "tiny"))
    views = cell.attack.trigger_views(cell.data, cell.plan)
    assert views.boxes is None and (cell.plan.train.images[views.rows] != views.clean).any()
    targeted = prepare(resolve("targeted", "clip", "tiny"))
    assert targeted.attack.trigger_views(targeted.data, targeted.plan) is None


def test_watching_curves_and_views_changes_nothing_in_training():
    cfg = resolve("badnet", "aug-only", "tiny", attack_params={"n_poison": 30}, epochs=1)
    cell = prepare(cfg)

    def trained(watch: bool):
        torch.manual_seed(0)
        model, tok = create_model(cfg.model)
        extra = cell.watchers(tok) if watch else {}
        result = train(model, tok, cell.plan.train, prepare(cfg).defense, cfg, torch.device("cpu"), progress=False,
                       **extra)
        return model.state_dict(), result

    plain, _ = trained(False)
    watched, result = trained(True)
    for k, v in plain.items():
        assert torch.equal(v, watched[k]), k
    (record,) = result.history
    # the poisoned rows among the epoch's batches (the last partial batch is dropped)
    n = len(cell.plan.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "shuffle", 1)))
    used = order[: n // cfg.batch_size * cfg.batch_size]
    assert record["epoch"] == 1 and record["trig_n"] == int(cell.plan.train.is_poison[used].sum()) > 20
    assert 0 <= record["trig_present"] <= record["trig_n"] and "clean_top1" in record and "asr" in record


def test_a_data_filter_probe_follows_the_kept_rows():
    clean = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    views = TriggerViews(torch.tensor([2, 5, 7]), clean, torch.tensor([[0, 0, 2, 2]] * 3))
    probe = TriggerSurvival(views, 8, index=torch.tensor([0, 5, 6, 7]))  # the trainer's rows 1 and 3 are poisoned
    assert probe.slot.tolist() == [-1, 1, -1, 2]
    with pytest.raises(ValueError, match="one of each"):
        TriggerViews(torch.tensor([1, 2]), clean, None)
    assert dataclasses.is_dataclass(views)


def test_an_augmentation_that_is_not_a_kornia_container_trains_unwatched_with_a_warning():
    clean = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    probe = TriggerSurvival(TriggerViews(torch.tensor([0, 1]), clean, torch.tensor([[0, 0, 2, 2]] * 2)), 2)
    with pytest.warns(UserWarning, match="not measured"):
        probe(torch.tensor([0, 1]), clean, clean.float() / 255, lambda x: x.flip(-1))
    assert probe.take_epoch() == {}


def test_trigger_views_refuse_what_would_give_wrong_numbers_and_a_manifest_without_sources_gives_none():
    clean = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    for bad in (dict(clean=clean.float()), dict(boxes=torch.tensor([[6, 6, 10, 10]])), dict(boxes=torch.tensor([[2, 2, 2, 4]]))):
        with pytest.raises(ValueError, match="trigger views"):
            TriggerViews(**{"rows": torch.tensor([0]), "clean": clean, "boxes": torch.tensor([[0, 0, 2, 2]]), **bad})
    cell = prepare(resolve("badnet", "clip", "tiny"))
    cell.plan.manifest.pop("source_rows")  # as a plugin that writes its own manifest
    assert cell.attack.trigger_views(cell.data, cell.plan) is None
