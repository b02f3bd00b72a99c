"""Augmentation-only baseline: RoCLIP's image and EDA text augmentations with the plain CLIP loss
(the official code's ``--cross_aug`` without the pool; docs/roclip-spec.md §1.2, §6 row 9)."""
from __future__ import annotations

from dataclasses import dataclass

from poisonbench import wordnet
from poisonbench.augment import eda_captions, image_augmentation
from poisonbench.registry import param, register_defense
from poisonbench.utils import derive_seed

from .base import Defense


@dataclass
class AugOnlyParams:
    eda_alpha: float = param(0.1, "EDA strength: alpha_sr = alpha_ri = alpha_rs = p_rd (Wei & Zou 2019), in [0, 1]")
    min_crop: float = param(0.08, "smallest RandomResizedCrop area, as a fraction of the image, in (0, 1]")
    # Added after release (hash_default=False: existing cells keep their run ids). With eda_alpha=0
    # (captions unchanged) the two halves of the augmentation can be measured apart.
    image_augment: bool = param(True, "augment the images (False: EDA only; eda_alpha=0 gives images only)",
                                hash_default=False)


@register_defense("aug-only")
class AugOnly(Defense):
    """CLIP loss on augmented images (fresh view every epoch) and one fixed EDA rewrite per
    caption (the original caption is never used), as in RoCLIP's code (docs/roclip-spec.md §1.8-1.9)."""

    Params = AugOnlyParams
    augment = True

    def __init__(self, params, seed: int):
        super().__init__(params, seed)
        if not 0.0 <= params.eda_alpha <= 1.0:
            raise ValueError(f"{self.name}: eda_alpha must be in [0, 1], got {params.eda_alpha}")
        if not 0.0 < params.min_crop <= 1.0:
            raise ValueError(f"{self.name}: min_crop must be in (0, 1], got {params.min_crop}")

    def check(self, train_size: int) -> None:
        if self.augment and self.params.eda_alpha > 0:
            wordnet.wordnet()  # load it now: a missing WordNet must stop the run before training

    def text_transform_key(self) -> dict | None:
        """EDA's seed and alpha (shared by every defense that rewrites captions this way, RoCLIP too)."""
        return {"transform": "eda", "seed": derive_seed("eda", self.seed), "alpha": self.params.eda_alpha} if self.augment else None

    def text_transform(self, captions: list[str]) -> list[str]:
        if not self.augment:
            return captions
        return eda_captions(captions, derive_seed("eda", self.seed), self.params.eda_alpha)

    def train_transform(self, image_size: int):
        if not (self.augment and self.params.image_augment):
            return None
        return image_augmentation(image_size, self.params.min_crop)
