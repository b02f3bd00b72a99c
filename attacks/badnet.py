"""BadNets patch backdoor (Gu et al. 2017), as used against CLIP by Carlini & Terzis (2022)
and RoCLIP (docs/roclip-spec.md §3.2): one fixed, seeded random patch pasted on uint8 images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from poisonbench.registry import param, register_attack

from .backdoor import BackdoorAttack, BackdoorParams

Location = Literal["random", "top-left", "top-right", "bottom-left", "bottom-right"]
LOCATIONS = get_args(Location)


@dataclass
class BadNetParams(BackdoorParams):
    patch_size: int = param(4, "side of the square patch, in pixels of the stored training image (the dataset's image_size)")
    location: Location = param("bottom-right", "random (a fresh seeded position per image) or a corner: top-left, top-right, bottom-left, bottom-right")
    # Added after release: hash_default=False keeps the run ids of every cell at the default.
    pattern: Literal["fixed", "fresh"] = param(
        "fixed", "fixed (one seeded pattern per run, as Gu et al.) or fresh (CleanCLIP's 'random' patch: the image's "
                 "per-channel mean plus N(0, 1) noise, drawn anew for every poisoned and every evaluated image, "
                 "clamped to [0, 1])", hash_default=False)


def patch_positions(n: int, height: int, width: int, size: int, location: str, g: torch.Generator) -> torch.Tensor:
    """Top-left corners, int64 [n, 2] as (row, col), of a ``size`` px patch in ``height`` x ``width``
    images. ``random`` draws uniformly from every valid position, the last row and column included.
    Raises ValueError for an unknown location or a patch larger than the image."""
    if size < 1 or size > min(height, width):
        raise ValueError(f"patch_size {size} does not fit in {height}x{width} images")
    if location == "random":
        rows = torch.randint(0, height - size + 1, (n,), generator=g)
        cols = torch.randint(0, width - size + 1, (n,), generator=g)
        return torch.stack([rows, cols], dim=1)
    corners = {
        "top-left": (0, 0),
        "top-right": (0, width - size),
        "bottom-left": (height - size, 0),
        "bottom-right": (height - size, width - size),
    }
    if location not in corners:
        raise ValueError(f"unknown patch location {location!r}; valid locations: {', '.join(LOCATIONS)}")
    return torch.tensor([corners[location]], dtype=torch.int64).expand(n, 2)


def paste_patch(images: torch.Tensor, patch: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Copies of uint8 images [N, C, H, W] with uint8 ``patch`` [C, s, s] (one for all) or
    [N, C, s, s] (one per image) pasted at ``positions`` [N, 2] (row, col of the top-left corner).
    Pixels outside the patch are unchanged. One indexed assignment for the whole batch (no per-image
    loop)."""
    out = images.clone()
    s = patch.shape[-1]
    offsets = torch.arange(s)
    rows = (positions[:, 0, None] + offsets)[:, :, None]  # [N, s, 1]
    cols = (positions[:, 1, None] + offsets)[:, None, :]  # [N, 1, s]
    n = torch.arange(len(images))[:, None, None]
    out.permute(0, 2, 3, 1)[n, rows, cols] = patch.movedim(-3, -1)  # a view: writes into out
    return out


def fresh_patches(images: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """CleanCLIP's 'random' BadNets patch (docs/roclip-spec.md §3.2 (b); spec §6 row 15), one per
    image: the image's per-channel mean plus N(0, 1) noise, in [0, 1] units, clamped to [0, 1] (the
    official code does not clamp and leaves the uint8 overflow undefined), x 255 and truncated as
    its ``mul(255).byte()``. uint8 images [N, 3, H, W] -> uint8 patches [N, 3, size, size]."""
    mean = images.float().mean(dim=(2, 3), keepdim=True) / 255
    noise = torch.randn(len(images), images.shape[1], size, size, generator=g)
    return ((mean + noise).clamp(0, 1) * 255).to(torch.uint8)


@register_attack("badnet")
class BadNet(BackdoorAttack):
    """BadNets patch trigger: a fixed ``patch_size`` px pattern of seeded uniform random uint8
    colours (one per run, stored in the manifest), or with ``pattern=fresh`` CleanCLIP's noise patch
    drawn anew per image, pasted at a corner or a random position."""

    Params = BadNetParams

    def __init__(self, params: BadNetParams, seed: int):
        super().__init__(params, seed)
        if params.patch_size < 1:
            raise ValueError(f"badnet: patch_size must be >= 1, got {params.patch_size}")
        s = params.patch_size
        self.patch = torch.randint(0, 256, (3, s, s), generator=self.generator(0), dtype=torch.int64).to(torch.uint8)

    def check(self, data) -> None:
        super().check(data)
        h, w = data.train.images.shape[-2:]
        if self.params.patch_size > min(h, w):
            raise ValueError(f"badnet: patch_size {self.params.patch_size} does not fit in {h}x{w} training images")

    def apply_trigger(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        pos = patch_positions(n, h, w, self.params.patch_size, self.params.location, g)
        fresh = self.params.pattern == "fresh"
        return paste_patch(images, fresh_patches(images, self.params.patch_size, g) if fresh else self.patch, pos)

    def patch_boxes(self, data, plan) -> torch.Tensor:
        """The patch positions ``apply_trigger`` drew in ``poison`` (the same generator, drawn first)."""
        h, w = data.train.images.shape[-2:]
        n, s = len(self.source_rows(plan)), self.params.patch_size
        pos = patch_positions(n, h, w, s, self.params.location, self.generator(2))
        return torch.cat([pos, pos + s], dim=1)

    def trigger_manifest(self) -> dict:
        out = {"type": "patch", "location": self.params.location}
        if self.params.pattern == "fresh":
            return {**out, "pattern": "fresh: per-channel image mean + N(0, 1) noise, drawn per image"}
        return {**out, "patch": self.patch.tolist()}
