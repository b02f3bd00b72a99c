import pytest
import torch

from poisonbench.attacks.badnet import BadNet, BadNetParams, paste_patch, patch_positions


def make(seed=0, **kw) -> BadNet:
    return BadNet(BadNetParams(**kw), seed)


def test_patch_is_fixed_per_seed_and_in_range():
    a, b, c = make(0, patch_size=5), make(0, patch_size=5), make(1, patch_size=5)
    assert a.patch.dtype == torch.uint8 and a.patch.shape == (3, 5, 5)
    assert torch.equal(a.patch, b.patch) and not torch.equal(a.patch, c.patch)
    assert a.patch.unique().numel() > 10  # a random pattern, not a flat square


@pytest.mark.parametrize(
    "location,corner",
    [("top-left", (0, 0)), ("top-right", (0, 9)), ("bottom-left", (7, 0)), ("bottom-right", (7, 9))],
)
def test_corner_placement_is_pixel_exact(location, corner):
    images = torch.randint(0, 256, (4, 3, 10, 12), dtype=torch.uint8)
    attack = make(patch_size=3, location=location)
    out = attack.apply_trigger(images, torch.Generator().manual_seed(0))
    r, c = corner
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[r : r + 3, c : c + 3] = True
    for i in range(4):
        assert torch.equal(out[i][:, mask].view(3, 3, 3), attack.patch)
        assert torch.equal(out[i][:, ~mask], images[i][:, ~mask])  # nothing else changes
    assert out.dtype == torch.uint8


def test_random_location_reaches_every_position_including_last_row_and_column():
    g = torch.Generator().manual_seed(0)
    pos = patch_positions(5000, 8, 6, 3, "random", g)
    rows, cols = set(pos[:, 0].tolist()), set(pos[:, 1].tolist())
    assert rows == set(range(0, 6)) and cols == set(range(0, 4))  # 8-3=5 and 6-3=3 are reachable


def test_patch_equal_to_image_size_and_too_large():
    assert patch_positions(2, 4, 4, 4, "random", torch.Generator()).eq(0).all()
    with pytest.raises(ValueError, match="does not fit"):
        patch_positions(1, 4, 4, 5, "bottom-right", torch.Generator())


def test_paste_keeps_values_clamped_to_uint8_range():
    images = torch.full((2, 3, 6, 6), 255, dtype=torch.uint8)
    patch = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    out = paste_patch(images, patch, torch.tensor([[4, 4], [0, 0]]))
    assert out.dtype == torch.uint8 and int(out.min()) == 0 and int(out.max()) == 255
    assert torch.equal(out[0, :, 4:, 4:], patch) and torch.equal(out[1, :, :2, :2], patch)
    assert torch.equal(images, torch.full_like(images, 255))  # the input is not modified


def test_poison_appends_flagged_pairs_with_target_captions(bundle):
    attack = make(n_poison=6, target="bag", patch_size=2)
    plan = attack.poison(bundle)
    assert len(plan.train) == 36 and plan.n_poison == 6
    assert plan.train.is_poison[30:].all() and not plan.train.is_poison[:30].any()
    src = torch.tensor(plan.manifest["source_rows"])
    assert (bundle.train.labels[src] != 2).all()  # sources come from outside the target class
    assert all("bag" in c for c in plan.train.captions[30:])
    assert torch.equal(plan.train.images[30:, :, -2:, -2:], attack.patch.expand(6, 3, 2, 2))
    assert plan.manifest["trigger"]["patch"] == attack.patch.tolist()
    assert plan.manifest_hash() == make(n_poison=6, target="bag", patch_size=2).poison(bundle).manifest_hash()


def test_poison_rate_and_bad_counts(bundle):
    attack = make(poison_rate=0.25, target="bag")
    assert attack.n_poison(30) == 10
    with pytest.raises(ValueError, match="only 20 images outside"):
        make(n_poison=21, target="bag").check(bundle)
    with pytest.raises(ValueError, match="n_poison must be >= 0"):
        make(n_poison=-1).check(bundle)
    with pytest.raises(ValueError, match="not in the evaluation classes: cat, dog, bag"):
        make(target="shoe").check(bundle)


def test_a_fresh_noise_patch_differs_between_images_and_is_reproducible_per_seed():
    """CleanCLIP's 'random' patch (pattern=fresh): per-channel image mean + N(0, 1) noise, per image."""
    from poisonbench.attacks.badnet import BadNet, BadNetParams

    images = torch.full((6, 3, 28, 28), 100, dtype=torch.uint8)
    attack = BadNet(BadNetParams(patch_size=4, location="top-left", pattern="fresh"), seed=0)
    a = attack.apply_trigger(images, torch.Generator().manual_seed(1))
    b = attack.apply_trigger(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # reproducible from the same seeded generator
    patches = a[:, :, :4, :4]
    assert all(not torch.equal(patches[0], patches[i]) for i in range(1, 6))  # drawn anew per image
    assert torch.equal(a[:, :, 4:, :], images[:, :, 4:, :]) and torch.equal(a[:, :, :, 4:], images[:, :, :, 4:])
    # centred on the image's mean (100/255) with unit noise in [0, 1] units, clamped
    assert abs(patches.float().mean().item() - 255 * 0.45) < 255 * 0.15
    fixed = BadNet(BadNetParams(patch_size=4, location="top-left"), seed=0).apply_trigger(images, torch.Generator())
    assert all(torch.equal(fixed[0, :, :4, :4], fixed[i, :, :4, :4]) for i in range(6))
