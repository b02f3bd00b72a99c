import random

import pytest
import torch

from poisonbench.datasets.base import CaptionDataset, DatasetBundle, EvalSet

CLASSES = ["cat", "dog", "bag"]


@pytest.fixture
def bundle() -> DatasetBundle:
    """30 training pairs (10 per class) and 15 eval images (5 per class) of 12x12 random pixels."""
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    labels = torch.arange(3).repeat_interleave(10)
    captions = [f"a photo of a {CLASSES[y]} number {rng.randint(0, 9)}" for y in labels.tolist()]
    train = CaptionDataset(torch.randint(0, 256, (30, 3, 12, 12), generator=g, dtype=torch.uint8), captions, labels)
    ev = EvalSet(
        torch.randint(0, 256, (15, 3, 12, 12), generator=g, dtype=torch.uint8),
        torch.arange(3).repeat_interleave(5),
        list(CLASSES),
        ["a photo of a {}."],
    )
    return DatasetBundle(train, ev, [[c] for c in CLASSES], ["a picture of {}"])
