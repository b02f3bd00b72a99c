"""The density-filter plugin (Huang et al., ICLR 2025, as a data filter): what it embeds, how it
scores and what it keeps (spec-badclip-density-detection.md B.2, B.3, B.6)."""
import math

import pytest
import torch

from poisonbench.datasets.base import CaptionDataset
from poisonbench.defenses import density_scores as ds
from poisonbench.detection import detection_metrics
from poisonbench.registry import DEFENSES


class FakeCLIP(torch.nn.Module):
    """Image embedding = the mean pixel per channel and the top-left 2x2 pixels, plus a far offset
    for images whose top-left pixel is 255 (the "trigger"); text embedding = a fixed random vector
    per caption. Records the ``normalize`` flags it was called with."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.image_size = 8
        self.flags = []
        self.words = torch.randn(1000, 15, generator=torch.Generator().manual_seed(1)) * 0.3

    def encode_image(self, x, normalize=False):
        self.flags.append(normalize)
        feat = torch.cat([x.mean((2, 3)), x[:, :, :2, :2].flatten(1)], 1)
        return feat + 50.0 * (x[:, :1, 0, 0] > 1.5).float()  # normalised 255 in channel 0 is about 1.93

    def encode_text(self, tokens, normalize=False):
        self.flags.append(normalize)
        return self.words[tokens[:, 0]]  # a fixed random 15-d vector per caption, near the images' scale


def tokenizer(captions):
    return torch.tensor([[int(c.split()[-1])] for c in captions], dtype=torch.int64)  # the caption's number


def data_with_poisons(n=300, n_poison=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 200, (n, 3, 8, 8), generator=g, dtype=torch.int64).to(torch.uint8)
    is_poison = torch.zeros(n, dtype=torch.bool)
    is_poison[-n_poison:] = True
    images[is_poison, :, 0, 0] = 255
    captions = [f"a photo of item {i}" for i in range(n)]
    return CaptionDataset(images, captions, torch.zeros(n, dtype=torch.int64), is_poison)


def make(**over):
    return DEFENSES.get("density-filter")(DEFENSES.params("density-filter", over), seed=0)


@pytest.mark.parametrize("detector", ["dao", "slof", "k-distance"])
def test_isolated_poisons_are_found_and_removed(detector):
    data = data_with_poisons()
    f = make(detector=detector, batch_size=100, remove_fraction=0.05)
    scores = f.score(FakeCLIP(), tokenizer, data, torch.device("cpu"))
    kept = f.keep(scores)
    m = detection_metrics(scores, data.is_poison, kept)
    assert m["det_auroc"] == 1.0 and m["det_poisons_removed"] == 6
    assert int(kept.sum()) == math.floor(300 * 0.95)


def test_it_scores_unnormalised_embeddings_of_images_and_captions():
    model = FakeCLIP()
    make(paired=True, batch_size=100).score(model, tokenizer, data_with_poisons(), torch.device("cpu"))
    assert model.flags and not any(model.flags)  # B.2 / D5: normalize=False for both encoders


def test_scores_equal_the_per_batch_protocol_on_the_same_embeddings():
    """The plugin is density_scores.dataset_scores over its embeddings, with a seeded shuffle."""
    data, model = data_with_poisons(), FakeCLIP()
    f = make(detector="slof", batch_size=128, paired=False, embed_batch=7)
    got = f.score(model, tokenizer, data, torch.device("cpu"))
    from poisonbench.preprocess import eval_geometry, normalize
    from poisonbench.utils import derive_seed

    emb = model.encode_image(normalize(eval_geometry(data.images, 8)))
    g = torch.Generator().manual_seed(derive_seed("density-filter", 0))
    want = ds.dataset_scores(lambda rows: (emb[rows], None), len(data), 128, g, detector="slof", k=16,
                             index_mode="faithful", paired=False)
    assert torch.allclose(got, want)


def test_bad_parameters_are_refused_before_training():
    with pytest.raises(Exception, match="remove_fraction"):
        make(remove_fraction=1.0)
    with pytest.raises(ValueError, match="lower k"):
        make(k=200, batch_size=100).check(1000)
