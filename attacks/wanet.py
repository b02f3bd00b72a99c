"""WaNet: warping-based backdoor (Nguyen & Tran, ICLR 2021, "WaNet - Imperceptible Warping-based
Backdoor Attack", §3.2). A fixed, seeded k x k field of random offsets, normalised by its mean
absolute value and upsampled (bicubic) to the image size, warps the image through grid_sample:
grid = clamp(identity + s * noise / H, -1, 1). The paper's "noise mode" (extra randomly warped
images with clean labels) is not used."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from poisonbench.registry import param, register_attack

from .backdoor import BackdoorAttack, BackdoorParams, map_pixels


@dataclass
class WaNetParams(BackdoorParams):
    k: int = param(4, "side of the control grid of random offsets (the paper's k)")
    strength: float = param(0.5, "warping strength s of the paper, >= 0")


def warp_grid(control: torch.Tensor, height: int, width: int, strength: float) -> torch.Tensor:
    """Sampling grid float32 [1, height, width, 2] (x, y in [-1, 1]) from ``control`` [1, 2, k, k]."""
    noise = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack([xs, ys], dim=-1)[None]
    return (identity + strength * noise / height).clamp(-1, 1)


@register_attack("wanet")
class WaNet(BackdoorAttack):
    """WaNet trigger: a fixed smooth warp of the whole image, invisible at a glance."""

    Params = WaNetParams

    def __init__(self, params: WaNetParams, seed: int):
        super().__init__(params, seed)
        if params.k < 2:
            raise ValueError(f"wanet: k must be >= 2, got {params.k}")
        if params.strength < 0:
            raise ValueError(f"wanet: strength must be >= 0, got {params.strength}")
        ins = torch.rand(1, 2, params.k, params.k, generator=self.generator(0)) * 2 - 1
        self.control = ins / ins.abs().mean()

    def apply_trigger(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        grid = warp_grid(self.control, *images.shape[-2:], self.params.strength)
        return map_pixels(images, lambda x: F.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear",
                                                           padding_mode="border", align_corners=True))

    def trigger_manifest(self) -> dict:
        return {"type": "warp", "k": self.params.k, "strength": self.params.strength, "control": self.control.tolist()}
