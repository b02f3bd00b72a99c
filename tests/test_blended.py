import pytest
import torch
from PIL import Image

from poisonbench.attacks.blended import Blended, BlendedParams, blend


def test_blend_moves_every_pixel_by_alpha_towards_the_key():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    key = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    out = blend(images, key, 0.2)
    expected = (0.8 * images.double() + 0.2 * key.double()).round().clamp(0, 255)
    assert out.dtype == torch.uint8
    assert (out.double() - expected).abs().max() <= 1  # float32 rounding at .5 may differ by one level
    assert torch.equal(blend(images, key, 1.0), key.expand_as(images))


def test_noise_key_is_fixed_per_seed_and_stays_in_range(bundle):
    a, b, c = (Blended(BlendedParams(n_poison=4), s) for s in (0, 0, 1))
    ta = a.apply_trigger(bundle.eval.images, torch.Generator())
    assert torch.equal(ta, b.apply_trigger(bundle.eval.images, torch.Generator()))
    assert not torch.equal(ta, c.apply_trigger(bundle.eval.images, torch.Generator()))
    assert ta.dtype == torch.uint8 and int(ta.min()) >= 0 and int(ta.max()) <= 255
    changed = (ta != bundle.eval.images).float().mean()
    assert changed > 0.5  # a blend touches (almost) every pixel, not a patch


def test_key_from_an_image_file(tmp_path, bundle):
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "k.png")
    attack = Blended(BlendedParams(key=str(tmp_path / "k.png"), alpha=0.5, n_poison=4), 0)
    out = attack.apply_trigger(torch.zeros(1, 3, 12, 12, dtype=torch.uint8), torch.Generator())
    assert out[0, 0].unique().tolist() == [128] and out[0, 1:].unique().tolist() == [0]
    with pytest.raises(ValueError, match="cannot read the key image"):
        Blended(BlendedParams(key=str(tmp_path / "missing.png")), 0)
    with pytest.raises(ValueError, match="alpha"):
        Blended(BlendedParams(alpha=0.0), 0)


def test_poisoned_pairs_are_blended_copies_with_target_captions(bundle):
    attack = Blended(BlendedParams(n_poison=5, target="dog"), 0)
    plan = attack.poison(bundle)
    src = torch.tensor(plan.manifest["source_rows"])
    assert torch.equal(plan.train.images[30:], blend(bundle.train.images[src], attack.key, 0.2))
    assert all("dog" in c for c in plan.train.captions[30:])
    assert plan.manifest["trigger"]["key_sha256"]


def test_a_fresh_key_differs_between_images_and_is_reproducible_per_seed():
    """key=fresh: CleanCLIP's blend with a uniform noise key drawn per image."""
    from poisonbench.attacks.blended import Blended, BlendedParams

    images = torch.full((5, 3, 16, 16), 50, dtype=torch.uint8)
    attack = Blended(BlendedParams(key="fresh", alpha=0.2), seed=0)
    a = attack.apply_trigger(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, attack.apply_trigger(images, torch.Generator().manual_seed(3)))
    assert all(not torch.equal(a[0], a[i]) for i in range(1, 5))
    residual = (a.float() - 0.8 * 50) / 0.2  # the key, up to rounding
    assert residual.min() >= -3 and residual.max() <= 258 and abs(residual.mean().item() - 127.5) < 5
    from poisonbench.config import resolve

    assert resolve("blended", "clip", "tiny", attack_params={"key": "fresh"}).run_id != \
        resolve("blended", "clip", "tiny").run_id
