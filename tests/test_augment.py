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
