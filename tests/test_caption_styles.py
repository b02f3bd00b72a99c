"""Fashion-MNIST caption styles (datasets/fashion_captions.py): grounded in the pixels, seeded, and
the default unchanged."""
import random
import re

import pytest
import torch

from poisonbench.config import resolve
from poisonbench.datasets.fashion_captions import RELATED, UNNAMED, describe, measure, web_caption
from poisonbench.datasets.fashion_mnist import CLASS_WORDS, CLASSNAMES, FashionMNIST, FashionMNISTParams, write_caption


def load(n=600, **kw):
    return FashionMNIST(FashionMNISTParams(n_train=n, n_eval=100, n_probe=100, n_heldout=50, n_finetune=0, **kw)).load(0)


def test_the_default_style_writes_the_captions_it_always_wrote():
    data = load()
    rng = random.Random(0)
    assert data.train.captions == [write_caption(int(y), rng) for y in data.train.labels]
    # and the run ids of existing cells are those of before (the parameters are hash_default=False)
    assert resolve("badnet", "clip", "tiny").run_id == resolve("badnet", "clip", "tiny",
                                                               dataset_params={"captions": "templates"}).run_id


def test_measurements_are_those_of_the_pixels():
    images = torch.zeros(2, 3, 28, 28, dtype=torch.uint8)
    images[0, :, 2:12, 3:8] = 200  # a 10 x 5 block, top left: tall, high and left, plain
    images[1, :, 20:24, 4:24] = torch.tensor([60, 120]).repeat(10)  # a 4 x 20 striped band, low: wide
    m = measure(images)
    assert m["extent"].tolist() == pytest.approx([50 / 784, 80 / 784])
    assert m["aspect"].tolist() == pytest.approx([2.0, 0.2])
    assert m["brightness"].tolist() == pytest.approx([200 / 255, 90 / 255], abs=1e-6)
    assert m["texture"].tolist() == pytest.approx([0.0, 30 / 255], abs=1e-6)
    assert m["dx"][0] == pytest.approx(5.0 - 13.5) and m["dy"][0] == pytest.approx(6.5 - 13.5)
    words = describe(m, {"brightness": (0.3, 0.6), "extent": (0.07, 0.09), "texture": (0.05, 0.1)})
    assert words[0].aspect == "tall and narrow" and words[0].position == "sitting high and left in the frame"
    assert (words[0].brightness, words[0].extent, words[0].texture) == ("light", "small", "plain")
    assert (words[1].aspect, words[1].position, words[1].brightness) == ("wide and low", "sitting low in the frame",
                                                                          "mid-grey")


def test_attribute_captions_name_the_garment_and_differ_within_a_class():
    data = load(captions="attributes")
    for y, caption in zip(data.train.labels.tolist(), data.train.captions):
        assert any(re.search(rf"\b{re.escape(w)}\b", caption) for w in CLASS_WORDS[y]), caption
    shirts = [c for y, c in zip(data.train.labels.tolist(), data.train.captions) if y == 6]
    assert len(set(shirts)) == len(shirts)  # the pixels, not a few templates, make them differ
    assert data.train.captions == load(captions="attributes").train.captions  # seeded
    assert data.heldout.captions[0] != load().heldout.captions[0]  # the hold-out is captioned alike


def test_web_captions_leave_out_or_swap_the_class_at_the_set_shares():
    attrs = describe(measure(torch.full((1, 3, 28, 28), 100, dtype=torch.uint8)),
                     {k: (0.3, 0.6) for k in ("brightness", "extent", "texture")})[0]
    rng, n = random.Random(3), 4000
    captions = [web_caption("t-shirt", "t-shirt", attrs, rng, 0.3, 0.2) for _ in range(n)]
    related = sum(bool(re.search(r"\b(a shirt|a pullover)\b", c)) for c in captions) / n
    unnamed = sum("t-shirt" not in c and not re.search(r"\b(a shirt|a pullover)\b", c) for c in captions) / n
    assert all(any(u in c for u in UNNAMED) for c in captions if "shirt" not in c and "pullover" not in c)
    assert unnamed == pytest.approx(0.3, abs=0.03) and related == pytest.approx(0.2, abs=0.03)
    assert RELATED["bag"] == [] and set(RELATED) == set(CLASSNAMES)
    bags = [web_caption("bag", "bag", attrs, random.Random(4), 0.0, 1.0) for _ in range(50)]
    assert not any("bag" in c for c in bags)  # no related class: named none instead


def test_bad_caption_parameters_are_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match="templates, attributes, web"):
        FashionMNIST(FashionMNISTParams(captions="alt"))
    with pytest.raises(ValueError, match="sum <= 1"):
        FashionMNIST(FashionMNISTParams(captions="web", web_unnamed=0.8, web_related=0.5))
    with pytest.raises(ValueError, match="captions=web only"):
        FashionMNIST(FashionMNISTParams(captions="attributes", web_unnamed=0.5))
