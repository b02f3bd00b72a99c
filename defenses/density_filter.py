"""``density-filter``: local-density backdoor-sample detection before training (Huang, Erfani, Li,
Ma, Bailey, ICLR 2025, "Detecting Backdoor Samples in Contrastive Language Image Pretraining"),
as a data filter (shared/reference/spec-badclip-density-detection.md Part B).

Every training pair is embedded by the cached undefended CLIP (the ``clip`` cell's model on the
same poisoned data, B.2: the poisoned model itself), scored by a local outlier detector against the
other members of its random batch (B.3: images, plus the captions in paired mode), and the
``remove_fraction`` most suspicious pairs are dropped; a fresh CLIP is then trained from scratch on
the rest (B.6: no unlearning, no fine-tuning). The scores are in ``density_scores``.

Departures from the authors' code, each a parameter or stated here:
- embeddings are the un-normalised projected embeddings (B.2, D5) of images pre-processed as the
  model trains (CLIP's mean/std normalisation at the model's input size), in fp32 (the paper: AMP);
- the reference batch is ``batch_size`` pairs of the (single-process) cell, not 512 per GPU gathered
  over 4 GPUs (B.3); ``batch_size`` defaults to the paper's 2,048 and is capped by the data;
- which detector filters, its k and the index mode are parameters (B.10: report faithful and
  corrected).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from poisonbench.preprocess import eval_geometry, normalize
from poisonbench.registry import param, register_defense
from poisonbench.utils import derive_seed

from . import density_scores as ds
from .base import DataFilter


@dataclass
class DensityFilterParams:
    detector: Literal["dao", "slof", "k-distance", "lid"] = param(
        "dao", "local outlier score (B.4): dao (the paper filters with it, B.6), slof, k-distance or lid")
    k: Optional[int] = param(None, "neighbours; None = the paper's (16; 64 for lid), B.5")
    index_mode: Literal["faithful", "corrected"] = param(
        "faithful", "faithful: the authors' neighbour look-ups (quirks D1/D2); corrected: B.10's fix")
    paired: bool = param(True, "captions as extra references (the paper's CLIP runs, B.2/D4); False = images only")
    batch_size: int = param(ds.PAPER_BATCH_SIZE, "pairs per reference batch (B.3: 2,048 in the paper); capped by the data")
    remove_fraction: float = param(ds.DEFAULT_REMOVE_FRACTION, "fraction of the most suspicious pairs removed (B.6: 0.1), in [0, 1)")
    embed_batch: int = param(512, "pairs embedded per forward pass (memory only; the scores do not depend on it)")


@register_defense("density-filter")
class DensityFilter(DataFilter):
    """Drop the pairs whose image embedding is a local outlier among its batch (Huang et al. 2025)."""

    Params = DensityFilterParams
    test_params = {"batch_size": 256}

    def __init__(self, params: DensityFilterParams, seed: int):
        super().__init__(params, seed)
        if not 0.0 <= params.remove_fraction < 1.0:
            raise ValueError(f"density-filter: remove_fraction must be in [0, 1), got {params.remove_fraction}")
        if params.k is not None and params.k < 1:
            raise ValueError(f"density-filter: k must be >= 1 (or None for the paper's), got {params.k}")
        if params.embed_batch < 1:
            raise ValueError(f"density-filter: embed_batch must be >= 1, got {params.embed_batch}")

    def k(self) -> int:
        """The k in use: the parameter, or the paper's default for the detector (B.5)."""
        return ds.default_k(self.params.detector) if self.params.k is None else self.params.k

    def check(self, train_size: int) -> None:
        least = ds.min_batch_size(self.k(), self.params.paired)
        if min(train_size, self.params.batch_size) < least:
            raise ValueError(f"density-filter: k={self.k()} needs reference batches of at least {least} pairs "
                             f"(batch_size={self.params.batch_size}, {train_size} training pairs); lower k")

    @torch.no_grad()
    def score(self, model, tokenizer, data, device) -> torch.Tensor:
        """Per-pair scores, float [N] (higher = more suspicious), by ``density_scores.dataset_scores``
        over seeded random batches of ``min(batch_size, N)`` pairs."""
        p = self.params
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)

        def embed(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            images, texts = [], []
            for chunk in rows.split(p.embed_batch):
                x = normalize(eval_geometry(data.images[chunk], size).to(device))
                images.append(model.encode_image(x, normalize=False).float().cpu())
                if p.paired:
                    tokens = tokenizer([data.captions[i] for i in chunk.tolist()]).to(device)
                    texts.append(model.encode_text(tokens, normalize=False).float().cpu())
            return torch.cat(images), (torch.cat(texts) if p.paired else None)

        g = torch.Generator().manual_seed(derive_seed("density-filter", self.seed))
        return ds.dataset_scores(embed, len(data), min(p.batch_size, len(data)), g, detector=p.detector,
                                 k=self.k(), index_mode=p.index_mode, paired=p.paired)

    def keep(self, scores: torch.Tensor) -> torch.Tensor:
        """The floor(N * (1 - remove_fraction)) lowest scores (B.6, B.11.14; ties: earlier row)."""
        return ds.keep_lowest(scores, self.params.remove_fraction)
