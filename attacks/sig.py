"""SIG: sinusoidal signal backdoor (Barni, Kallas, Tondi 2019, "A new backdoor attack in CNNs by
training set corruption without label poisoning", §3): x' = clamp(x + delta * sin(2 pi j f / W)),
a horizontal sinusoid added to every row and channel. Poisoned as the other backdoors here
(non-target images with captions naming the target), as CleanCLIP's 'SIG' patch type does."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from poisonbench.registry import param, register_attack

from .backdoor import BackdoorAttack, BackdoorParams, map_pixels


@dataclass
class SIGParams(BackdoorParams):
    delta: float = param(20.0, "amplitude of the sinusoid, in uint8 pixel levels (0-255)")
    frequency: float = param(6.0, "periods across the image width")


def sinusoid(width: int, delta: float, frequency: float) -> torch.Tensor:
    """delta * sin(2 pi j frequency / width) for columns j = 0..width-1, float32 [width]."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * j * frequency / width)).float()


@register_attack("sig")
class SIG(BackdoorAttack):
    """SIG trigger: a fixed horizontal sinusoid of amplitude ``delta`` added to the whole image."""

    Params = SIGParams

    def __init__(self, params: SIGParams, seed: int):
        super().__init__(params, seed)
        if not 0 < params.delta <= 255:
            raise ValueError(f"sig: delta must be in (0, 255], got {params.delta}")
        if params.frequency <= 0:
            raise ValueError(f"sig: frequency must be > 0, got {params.frequency}")

    def apply_trigger(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        wave = sinusoid(images.shape[-1], self.params.delta, self.params.frequency)
        return map_pixels(images, lambda x: x.add_(wave))

    def trigger_manifest(self) -> dict:
        return {"type": "sig", "delta": self.params.delta, "frequency": self.params.frequency}
