import re

import pytest
import torch

from poisonbench.attacks.base import ZeroShotModel
from poisonbench.attacks.targeted import Targeted, TargetedParams

CLASSES = ["cat", "dog", "bag"]  # as in conftest.bundle


def attack(n_targets=15, pairs=2, seed=0):
    return Targeted(TargetedParams(n_targets=n_targets, pairs_per_target=pairs), seed)


@pytest.mark.parametrize("seed", range(20))
def test_adversarial_class_is_never_the_true_class(bundle, seed):
    rows, adversarial = attack(seed=seed).choose_targets(bundle)
    assert len(set(rows.tolist())) == 15  # distinct target images
    assert (adversarial != bundle.eval.labels[rows]).all()
    assert ((0 <= adversarial) & (adversarial < 3)).all()


def test_adversarial_classes_cover_every_other_class(bundle):
    pairs = set()
    for seed in range(30):
        rows, adversarial = attack(seed=seed).choose_targets(bundle)
        pairs |= set(zip(bundle.eval.labels[rows].tolist(), adversarial.tolist()))
    assert pairs == {(t, a) for t in range(3) for a in range(3) if t != a}


def test_poisoned_pairs_are_target_images_with_captions_naming_the_adversarial_class(bundle):
    bundle.train.captions = [f"a photo of a {CLASSES[y]} #{i}" for i, y in enumerate(bundle.train.labels.tolist())]
    a = attack(n_targets=4, pairs=5)
    plan = a.poison(bundle)
    n = len(bundle.train)
    assert len(plan.train) == n + 20 and plan.n_poison == 20
    assert plan.train.captions[:n] == bundle.train.captions  # clean rows untouched
    for i, t in enumerate(plan.manifest["targets"]):
        block = slice(n + 5 * i, n + 5 * (i + 1))
        target_image = bundle.eval.images[t["eval_row"]]
        assert (plan.train.images[block] == target_image).all()
        captions = plan.train.captions[block]
        assert all(re.search(rf"\b{t['adversarial_class']}\b", c) for c in captions)
        # real training captions of that class, drawn without replacement (10 exist per class)
        assert len(set(captions)) == 5 and set(captions) <= set(bundle.train.captions)


def test_templates_used_when_no_training_caption_names_the_class(bundle):
    bundle.train.captions = ["a photo of something"] * len(bundle.train)
    plan = attack(n_targets=3, pairs=2).poison(bundle)
    for t, c in zip([t for t in plan.manifest["targets"] for _ in range(2)], plan.train.captions[-6:]):
        assert c == f"a picture of a {t['adversarial_class']}"  # with_article adds the "a"


def test_poisoning_is_deterministic_given_the_seed(bundle):
    p0, p1, p2 = attack(seed=0).poison(bundle), attack(seed=0).poison(bundle), attack(seed=1).poison(bundle)
    assert p0.manifest == p1.manifest and torch.equal(p0.train.images, p1.train.images)
    assert p0.manifest != p2.manifest


def test_asr_counts_targets_whose_top1_is_the_adversarial_class(bundle):
    a = attack(n_targets=6, pairs=1)
    plan = a.poison(bundle)
    targets = plan.manifest["targets"]
    adv = {t["eval_row"]: CLASSES.index(t["adversarial_class"]) for t in targets}
    true = {t["eval_row"]: CLASSES.index(t["true_class"]) for t in targets}
    fooled = {t["eval_row"] for t in targets[:2]}  # the model is fooled on the first two targets
    # tag each eval image with its row so the fake model can look it up
    bundle.eval.images[:, 0, 0, 0] = torch.arange(len(bundle.eval), dtype=torch.uint8)

    def model(images):
        rows = images[:, 0, 0, 0].tolist()
        top1 = torch.tensor([adv[r] if r in fooled else true[r] for r in rows])
        second = torch.tensor([adv[r] for r in rows])  # adversarial class always in the top 5
        return torch.stack([top1, second, top1, top1, top1], 1)

    out = a.evaluate(ZeroShotModel(model, 12), bundle, plan)
    assert out["asr"] == pytest.approx(2 / 6) and out["asr_n"] == 6 and out["asr_top5"] == 1.0
    assert [r["success"] for r in out["targets"]] == [True, True, False, False, False, False]
    for r in out["targets"]:
        expected = r["adversarial_class"] if r["success"] else r["true_class"]
        assert r["predicted_class"] == expected


@pytest.mark.parametrize("kw, msg", [({"n_targets": 0}, "n_targets"), ({"n_targets": 16}, r"\[1, 15\]"),
                                     ({"pairs": 0}, "pairs_per_target")])
def test_bad_parameters_are_refused(bundle, kw, msg):
    with pytest.raises(ValueError, match=msg):
        attack(**kw).check(bundle)


def test_more_poisoned_pairs_than_clean_pairs_are_refused(bundle):
    with pytest.raises(ValueError, match="lower pairs_per_target"):
        attack(n_targets=4, pairs=8).check(bundle)  # 32 pairs > 30 clean pairs
