import torch

from poisonbench.attacks.wanet import WaNet, WaNetParams


def test_zero_strength_is_the_identity_and_the_warp_is_seeded():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(WaNet(WaNetParams(strength=0.0), 0).apply_trigger(images, torch.Generator()), images)
    a = WaNet(WaNetParams(strength=2.0), 0).apply_trigger(images, torch.Generator())
    b = WaNet(WaNetParams(strength=2.0), 0).apply_trigger(images, torch.Generator())
    c = WaNet(WaNetParams(strength=2.0), 1).apply_trigger(images, torch.Generator())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and (a != images).float().mean() > 0.3


def test_warp_moves_pixels_but_keeps_the_value_range():
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).view(1, 1, 1, 16).expand(2, 3, 16, 16).contiguous()
    out = WaNet(WaNetParams(strength=1.0), 0).apply_trigger(ramp, torch.Generator())
    assert int(out.min()) >= int(ramp.min()) and int(out.max()) <= int(ramp.max())  # interpolation, no new extremes
    assert not torch.equal(out, ramp)
