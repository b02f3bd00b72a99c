"""Blended backdoor (Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using
Data Poisoning", §4.2): x' = (1 - alpha) x + alpha k with one fixed key image k per run, the same
alpha at training and test time (docs/roclip-spec.md §3.2, §6 row 16)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from poisonbench.registry import param, register_attack

from .backdoor import BackdoorAttack, BackdoorParams, map_pixels


@dataclass
class BlendedParams(BackdoorParams):
    alpha: float = param(0.2, "blend weight of the key, in (0, 1], at training and test time")
    key: str = param("noise", "noise (one seeded uniform random image per run), fresh (a uniform noise image drawn "
                              "anew for every poisoned and every evaluated image, as CleanCLIP's code) or the path of "
                              "an image file")


def blend(images: torch.Tensor, key: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * images + alpha * key, rounded to the nearest integer and clamped to 0..255.

    Args:
        images: uint8 [N, 3, H, W].
        key: uint8 [3, h, w]; resized (bilinear, antialiased) to H x W when the sizes differ.
        alpha: blend weight in [0, 1].
    Returns:
        uint8 [N, 3, H, W].
    """
    k = key.float()
    if k.shape[-2:] != images.shape[-2:]:
        k = F.interpolate(k[None], size=tuple(images.shape[-2:]), mode="bilinear", antialias=True, align_corners=False)[0]
    k = alpha * k
    return map_pixels(images, lambda x: x.mul_(1.0 - alpha).add_(k))


def fresh_blend(images: torch.Tensor, alpha: float, g: torch.Generator, chunk: int = 2048) -> torch.Tensor:
    """CleanCLIP's blended trigger (docs/roclip-spec.md §3.2 (b), §6 row 16): each image blended
    with its own uniform noise key drawn from ``g``, (1 - alpha) x + alpha k, rounded and clamped
    as ``blend``. uint8 [N, 3, H, W] -> uint8 [N, 3, H, W]; reproducible for a seeded ``g``."""
    out = torch.empty_like(images)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].float()
        keys = torch.randint(0, 256, x.shape, generator=g).float()
        out[i : i + chunk] = x.mul_(1.0 - alpha).add_(keys.mul_(alpha)).round_().clamp_(0, 255)
    return out


def load_key(path: str) -> torch.Tensor:
    """An image file as uint8 [3, H, W] (RGB); ValueError naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB")).copy()
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"blended: cannot read the key image {path!r} ({e}); key is noise, fresh or the path of "
                         "an image file") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


@register_attack("blended")
class Blended(BackdoorAttack):
    """Blended trigger: every pixel moves towards one fixed key image by ``alpha``."""

    Params = BlendedParams

    def __init__(self, params: BlendedParams, seed: int):
        super().__init__(params, seed)
        if not 0.0 < params.alpha <= 1.0:
            raise ValueError(f"blended: alpha must be in (0, 1], got {params.alpha}")
        self.key = load_key(params.key) if params.key not in ("noise", "fresh") else None

    def key_for(self, height: int, width: int) -> torch.Tensor:
        """The key, uint8 [3, h, w]; the seeded noise key is drawn once, at the first image size seen:
        the stored size of the training images, where every trigger is applied (attacks/backdoor.py)."""
        if self.key is None:
            self.key = torch.randint(0, 256, (3, height, width), generator=self.generator(0)).to(torch.uint8)
        return self.key

    def apply_trigger(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.params.key == "fresh":  # CleanCLIP: clip(0.2 U + 0.8 x), U uniform noise drawn per image
            return fresh_blend(images, self.params.alpha, g)
        return blend(images, self.key_for(*images.shape[-2:]), self.params.alpha)

    def trigger_manifest(self) -> dict:
        key = self.key
        return {
            "type": "blend",
            "alpha": self.params.alpha,
            "key": self.params.key,
            "key_shape": list(key.shape) if key is not None else None,
            "key_sha256": hashlib.sha256(key.numpy().tobytes()).hexdigest() if key is not None else None,
        }
