import pytest
import torch

from poisonbench.attacks.base import ZeroShotModel
from poisonbench.attacks.badnet import BadNet, BadNetParams


def label_in_pixel(bundle):
    """Encode each eval image's class in its top-left pixel (the patch goes bottom-right)."""
    bundle.eval.images[:, :, 0, 0] = bundle.eval.labels.view(-1, 1).to(torch.uint8)
    return bundle


def reads_pixel(images):
    """A 'model' that ignores the trigger: top-1 = the class written in the top-left pixel."""
    top1 = images[:, 0, 0, 0].long()
    return torch.stack([top1] + [(top1 + k) % 3 for k in (1, 2)] + [top1, top1], dim=1)


def test_model_ignoring_trigger_scores_zero_and_target_images_are_excluded(bundle):
    bundle = label_in_pixel(bundle)
    attack = BadNet(BadNetParams(target="bag", patch_size=3, n_poison=4), 0)
    plan = attack.poison(bundle)
    out = attack.evaluate(ZeroShotModel(reads_pixel, 12), bundle, plan)
    # 5 of the 15 eval images are bags: counted in, they would give 5/15 successes.
    # Without the trigger the same 10 images are all classified correctly.
    assert out == {"asr": 0.0, "asr_n": 10, "clean_top1_nontarget": 1.0}


def test_model_obeying_trigger_scores_one(bundle):
    attack = BadNet(BadNetParams(target="dog", patch_size=3, n_poison=4), 0)
    plan = attack.poison(bundle)

    def obeys(images):  # predicts dog exactly when the patch is present
        has_patch = (images[:, :, -3:, -3:] == attack.patch).flatten(1).all(1)
        top1 = torch.where(has_patch, 1, 0)
        return top1.view(-1, 1).expand(-1, 5)

    # Clean, it predicts cat for all: right on the 5 cats of the 10 non-target images.
    assert attack.evaluate(ZeroShotModel(obeys, 12), bundle, plan) == {"asr": 1.0, "asr_n": 10, "clean_top1_nontarget": 0.5}


def test_trigger_applied_at_the_training_images_geometry(bundle):
    """12 px images (training and evaluation), an 8 px model: the patch is pasted at 12 px, as on
    the poisoned training images, and then resized/cropped with the image as in clean evaluation
    (attacks/backdoor.py; pixel-for-pixel checks in test_trigger_geometry.py)."""
    from poisonbench.preprocess import eval_geometry

    attack = BadNet(BadNetParams(target="dog", patch_size=2, n_poison=4), 0)
    plan = attack.poison(bundle)
    seen = []

    def record(images):
        seen.append(images)
        return torch.zeros(len(images), 5, dtype=torch.long)

    attack.evaluate(ZeroShotModel(record, 8), bundle, plan)
    patched = bundle.eval.images[bundle.eval.labels != 1].clone()
    patched[:, :, -2:, -2:] = attack.patch
    assert torch.equal(seen[0], eval_geometry(patched, 8))


def test_eval_set_without_target_class_raises(bundle):
    attack = BadNet(BadNetParams(target="banana"), 0)
    with pytest.raises(ValueError, match="not in the evaluation classes"):
        attack.evaluate(ZeroShotModel(reads_pixel, 12), bundle, None)


@pytest.mark.parametrize("name", ["badnet", "targeted"])
def test_precomputed_clean_predictions_give_the_same_metrics_without_predicting_clean_images_again(bundle, name):
    from poisonbench.attacks.targeted import Targeted, TargetedParams

    bundle = label_in_pixel(bundle)
    attack = (BadNet(BadNetParams(target="bag", patch_size=3, n_poison=4), 0) if name == "badnet"
              else Targeted(TargetedParams(n_targets=4, pairs_per_target=2), 0))
    plan = attack.poison(bundle)
    calls = []

    def counting(images):
        calls.append(len(images))
        return reads_pixel(images)

    plain = attack.evaluate(ZeroShotModel(counting, 12), bundle, plan)
    predicted = sum(calls)
    calls.clear()
    fast = attack.evaluate(ZeroShotModel(counting, 12, clean_top5=reads_pixel(bundle.eval.images)), bundle, plan)
    assert fast == plain
    n_clean = 10 if name == "badnet" else 4  # the clean non-target images / the target images
    assert sum(calls) == predicted - n_clean
