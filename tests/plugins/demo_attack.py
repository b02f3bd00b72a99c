"""A plugin as a third party would write it: a backdoor whose trigger is a white frame around the
image. It is registered when this module is imported (tests/test_conformance.py imports it), and
from then on the conformance suite tests it like any built-in attack; nothing else names it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonbench.attacks.backdoor import BackdoorAttack, BackdoorParams
from poisonbench.registry import param, register_attack


@dataclass
class FrameParams(BackdoorParams):
    width: int = param(1, "frame width, in pixels")


@register_attack("demo-frame")
class DemoFrame(BackdoorAttack):
    """All-to-one backdoor: a ``width`` px white frame (uint8 255) drawn on every triggered image."""

    Params = FrameParams
    # The parameters the conformance tests use: 30 poisoned pairs fit in the tiny profile's data.
    test_params = {"n_poison": 30, "width": 2}

    def apply_trigger(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        out, w = images.clone(), self.params.width
        out[..., :w, :] = 255
        out[..., -w:, :] = 255
        out[..., :, :w] = 255
        out[..., :, -w:] = 255
        return out

    def trigger_manifest(self) -> dict:
        return {"type": "frame", "width": self.params.width}
