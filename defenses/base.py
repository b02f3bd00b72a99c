"""The defense interface: the hooks one training loop calls (docs/DESIGN.md, "Registries")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from poisonbench.losses import info_nce


@dataclass
class TrainState:
    """Where training stands when a defense hook is called.

    Attributes:
        epoch: 1-indexed epoch.
        step: global optimizer step, 0-indexed.
        encode_captions: function n -> float [n, D] L2-normalised text embeddings (no gradient) of
            n training captions drawn at random, for defenses that need a warm caption pool.
    """

    epoch: int
    step: int
    encode_captions: Optional[Callable[[int], torch.Tensor]] = None


class Defense:
    """Base class of defenses: plain CLIP unless a hook is overridden.

    Hooks: ``text_transform`` (captions, once before training), ``train_transform`` (image
    augmentation per sample), ``start_epoch``, ``loss``; ``state_dict``/``load_state_dict`` carry
    any state the checkpoint must hold.
    """

    Params: type
    name: str

    def __init__(self, params, seed: int):
        self.params = params
        self.seed = seed

    def check(self, train_size: int) -> None:
        """Raise ValueError naming the problem if the defense cannot run on ``train_size``
        training pairs, or a resource it needs (e.g. WordNet) is missing; called before training."""

    def text_transform(self, captions: list[str]) -> list[str]:
        """Captions the model trains on, one per training pair (default: unchanged)."""
        return captions

    def train_transform(self, image_size: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """Batch augmentation, float [B, 3, H, W] in [0, 1] -> float [B, 3, S, S] in [0, 1] with an
        independent draw per image (randomness from torch's global RNG), or None for none."""
        return None

    def start_epoch(self, state: TrainState) -> None:
        """Called before the first step of each epoch."""

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, state: TrainState) -> torch.Tensor:
        """Training objective (scalar) of a batch of normalised embeddings [B, D]; default CLIP's InfoNCE."""
        return info_nce(image_emb, text_emb, logit_scale)

    def state_dict(self) -> dict:
        """Tensors and numbers to checkpoint (loadable with ``torch.load(weights_only=True)``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
