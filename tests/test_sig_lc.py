import math

import pytest
import torch

from poisonbench.attacks.badnet_lc import BadNetLC
from poisonbench.attacks.badnet import BadNetParams
from poisonbench.attacks.sig import SIG, SIGParams, sinusoid


def test_sig_adds_the_same_sinusoid_to_every_row_and_clamps():
    images = torch.full((2, 3, 4, 12), 128, dtype=torch.uint8)
    out = SIG(SIGParams(delta=20, frequency=3), 0).apply_trigger(images, torch.Generator())
    wave = [round(128 + 20 * math.sin(2 * math.pi * j * 3 / 12)) for j in range(12)]
    assert out.dtype == torch.uint8 and (out == torch.tensor(wave, dtype=torch.uint8)).all()
    white = SIG(SIGParams(delta=50), 0).apply_trigger(torch.full((1, 3, 2, 8), 250, dtype=torch.uint8), torch.Generator())
    assert int(white.max()) == 255 and int(white.min()) < 250  # clamped at the top, not wrapped
    assert torch.equal(sinusoid(8, 1.0, 2.0), sinusoid(8, 1.0, 2.0))
    with pytest.raises(ValueError, match="delta"):
        SIG(SIGParams(delta=0), 0)


def test_label_consistent_badnet_patches_target_images_in_place_and_keeps_captions(bundle):
    attack = BadNetLC(BadNetParams(n_poison=4, target="dog", patch_size=2), 0)
    plan = attack.poison(bundle)
    assert len(plan.train) == len(bundle.train) and plan.n_poison == 4
    rows = plan.train.is_poison.nonzero().squeeze(1)
    assert (bundle.train.labels[rows] == 1).all()  # only dogs
    assert plan.train.captions == bundle.train.captions  # no caption changed
    assert torch.equal(plan.train.images[rows][:, :, -2:, -2:], attack.patch.expand(4, 3, 2, 2))
    untouched = ~plan.train.is_poison
    assert torch.equal(plan.train.images[untouched], bundle.train.images[untouched])
    assert not torch.equal(bundle.train.images[rows], plan.train.images[rows])  # the clean set is not modified
    with pytest.raises(ValueError, match="only 10 images of the target class"):
        BadNetLC(BadNetParams(n_poison=11, target="dog"), 0).check(bundle)


def test_label_consistent_poison_rate_is_a_share_of_the_unchanged_training_set(bundle):
    from poisonbench.attacks.badnet_lc import BadNetLC, BadNetLCParams

    plan = BadNetLC(BadNetLCParams(target="bag", patch_size=2, poison_rate=0.2), 0).poison(bundle)
    assert len(plan.train) == 30 and plan.n_poison == 6 and plan.poison_rate == pytest.approx(0.2)
