"""Plain CLIP pre-training: the undefended baseline (Radford et al. 2021)."""
from __future__ import annotations

from dataclasses import dataclass

from poisonbench.registry import register_defense

from .base import Defense


@dataclass
class CLIPParams:
    pass


@register_defense("clip")
class CLIP(Defense):
    """No defense: symmetric InfoNCE on (image, caption) pairs, no augmentation."""

    Params = CLIPParams
