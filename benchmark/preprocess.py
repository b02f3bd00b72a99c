"""Image pre-processing shared by data, attacks, training and evaluation (a leaf module: torch and
torchvision only, so data and attack code can use it without loading the evaluator or open_clip).

Images stay uint8 until ``normalize``: the evaluation geometry (resize + centre crop to the model's
size) is applied first, so a trigger can be applied at exactly the pixels a model sees.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

# OpenAI CLIP's normalisation constants, as open_clip.constants.OPENAI_DATASET_MEAN / _STD (written
# out so that this module does not import open_clip; tests/test_preprocess.py checks they are equal).
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


def eval_geometry(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (shorter side to ``size``, bicubic, antialiased) and centre-crop uint8 images.

    Args:
        images: uint8 [N, 3, H, W].
    Returns:
        uint8 [N, 3, size, size]; the input itself when it already has that size.
    """
    if images.shape[-2:] == (size, size):
        return images
    t = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)])
    return t(images)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP's mean/std normalisation: uint8 [N, 3, S, S] in 0..255, or float in [0, 1],
    -> float32 [N, 3, S, S]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)
