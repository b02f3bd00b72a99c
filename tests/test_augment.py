import random

import pytest
import torch

from poisonbench.augment import clean_caption, eda, eda_captions, image_augmentation
from poisonbench.wordnet import synonyms


@pytest.mark.parametrize("caption", ["", "   ", "2024 12 31", "!!!", "猫の写真", "صورة قطة", "😀🎉"])
def test_eda_leaves_captions_without_latin_words_unchanged(caption):
    rng = random.Random(0)
    for _ in range(20):
        assert eda(caption, rng) == caption


def test_eda_cleans_and_changes_ordinary_captions():
    rng = random.Random(0)
    caption = "A photo of my new red leather handbag, 2 straps!"
    outs = [eda(caption, rng) for _ in range(200)]
    cleaned = clean_caption(caption)
    assert cleaned == "a photo of my new red leather handbag straps"
    assert all(o and set(o) <= set("abcdefghijklmnopqrstuvwxyz ") for o in outs)
    assert sum(o != cleaned for o in outs) > 100  # most rewrites change something
    lengths = {len(o.split()) for o in outs}
    n = len(cleaned.split())
    assert n - 1 in lengths or n - 2 in lengths  # deletion
    assert n + 1 in lengths  # insertion


def test_eda_is_seeded():
    caps = ["a photo of a dress", "my new boot", "a bag on a black background"] * 5
    assert eda_captions(caps, seed=3) == eda_captions(caps, seed=3)
    assert eda_captions(caps, seed=3) != eda_captions(caps, seed=4)
    with pytest.raises(ValueError, match="alpha"):
        eda("a b", random.Random(0), alpha=1.5)


def test_wordnet_synonyms_from_debian_package():
    syns = synonyms("photo")
    assert "photograph" in syns and "photo" not in syns
    assert synonyms("qwertyuiop") == ()


def test_image_augmentation_shapes_range_and_per_image_draws():
    x = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)).repeat(16, 1, 1, 1)
    torch.manual_seed(0)
    y = image_augmentation(28)(x)
    assert y.shape == (16, 3, 28, 28) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 + 1e-6
    # the same image gets different random views within one batch
    assert len({round(float(v), 4) for v in y.flatten(1).sum(1)}) > 8
    torch.manual_seed(0)
    assert torch.equal(image_augmentation(28)(x), y)  # reproducible from the seed


def test_eda_alpha_zero_is_the_identity_and_aug_only_can_be_split_in_halves():
    import dataclasses

    from poisonbench.augment import eda_captions
    from poisonbench.config import resolve
    from poisonbench.defenses.aug_only import AugOnly, AugOnlyParams

    captions = ["A photo of a Shirt, folded!", "a bag", "", "42", "ankle boot on a table"]
    assert eda_captions(captions, seed=3, alpha=0.0) == captions
    assert eda_captions(captions, seed=3, alpha=0.1) != captions  # on: it rewrites
    images_only = AugOnly(dataclasses.replace(AugOnlyParams(), eda_alpha=0.0), seed=0)
    assert images_only.text_transform(captions) == captions and images_only.train_transform(28) is not None
    eda_only = AugOnly(dataclasses.replace(AugOnlyParams(), image_augment=False), seed=0)
    assert eda_only.train_transform(28) is None and eda_only.text_transform(captions) != captions
    # the new switch keeps the run ids of every existing aug-only and roclip cell
    for d in ("aug-only", "roclip"):
        assert "image_augment" not in resolve("badnet", d).to_dict()["defense_params"]
        assert resolve("badnet", d, defense_params={"image_augment": False}).run_id != resolve("badnet", d).run_id


def _hue_inputs():
    """RGB batches in [0, 1] with the cases the conversions branch on: ties between channels,
    greys (a batch of them only, and some among colours), black, white, saturated primaries, 8-bit levels."""
    gen = torch.Generator().manual_seed(0)
    for k in range(40):
        x = torch.rand(32, 3, 7, 7, generator=gen)
        yield x if k % 3 == 0 else (x * (4 if k % 3 == 1 else 255)).round() / (4 if k % 3 == 1 else 255)
    yield torch.rand(16, 1, 6, 6, generator=gen).expand(16, 3, 6, 6).contiguous()  # every image grey
    corners = torch.tensor([[a, b, c] for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0) for c in (0.0, 0.5, 1.0)])
    yield corners.view(27, 3, 1, 1).expand(27, 3, 2, 2).contiguous()


def test_fast_hue_equals_kornias_adjust_hue_bit_for_bit():
    import math

    from kornia.enhance import adjust_hue as kornia_adjust_hue

    from poisonbench.augment import adjust_hue

    gen = torch.Generator().manual_seed(1)
    for x in _hue_inputs():
        for factor in ((torch.rand(len(x), generator=gen) * 2 - 1) * math.pi, torch.zeros(len(x))):
            want, got = kornia_adjust_hue(x, factor), adjust_hue(x, factor)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # signed zeros too
            assert got.is_contiguous()


def test_colour_jitter_equals_kornias_and_calls_the_fast_hue():
    import kornia.augmentation as K

    import poisonbench.augment as augment

    settings = dict(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1, p=0.8)
    ours, stock = augment.ColorJitter(**settings), K.ColorJitter(**settings)
    assert ours._hue_fn is augment.adjust_hue
    for seed, x in enumerate(_hue_inputs()):
        torch.manual_seed(seed)
        want = stock(x)
        torch.manual_seed(seed)
        assert torch.equal(ours(x).view(torch.int32), want.view(torch.int32))
    calls = []  # kornia really calls the hook (a kornia that stopped would leave the fast hue unused)
    ours._hue_fn = lambda x, f: calls.append(len(x)) or augment.adjust_hue(x, f)
    ours(torch.rand(8, 3, 5, 5))
    assert calls and isinstance(image_augmentation(28)[2], augment.ColorJitter)
