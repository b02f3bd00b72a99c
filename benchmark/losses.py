"""Contrastive objectives shared by the defenses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3): row i of each input is a positive
    pair, the other rows of the batch are negatives.

    Args:
        image_emb: float [B, D], L2-normalised.
        text_emb: float [B, D], L2-normalised.
        logit_scale: scalar tensor, exp of the learnable temperature (<= 100).
    Returns:
        scalar tensor: (CE(s I Tᵀ, arange) + CE(s T Iᵀ, arange)) / 2, in nats.
    """
    logits = logit_scale * image_emb @ text_emb.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
