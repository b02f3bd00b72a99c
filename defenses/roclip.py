"""RoCLIP (Yang, Gao, Mirzasoleiman, NeurIPS 2023, arXiv:2303.06854), per docs/roclip-spec.md §1 and §6.

A FIFO pool of detached, normalised caption embeddings. On matching epochs (1-indexed epochs
with ``epoch % match_every == 0``; epoch 1 is always plain CLIP) each image is paired with its
nearest pool caption by cosine similarity, queried before the current batch is enqueued, and the
loss is the in-batch symmetric InfoNCE between images and their matched captions. Other epochs
use the CLIP loss. Image and EDA augmentation apply in every epoch (as aug-only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from poisonbench.losses import info_nce
from poisonbench.registry import param, register_defense

from .aug_only import AugOnly, AugOnlyParams
from .base import TrainState


class CaptionPool:
    """FIFO ring buffer of L2-normalised caption embeddings (docs/roclip-spec.md §1.3, §6 row 5).

    Holds at most ``size`` rows of dimension ``dim`` (``dtype``, float32 by default). ``enqueue`` overwrites the oldest
    rows first and wraps around (a true ring, unlike lightly's drop-the-overflow). Entries are
    detached: no gradient flows into or out of the pool.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32):
        if size < 1:
            raise ValueError(f"caption pool size must be >= 1, got {size}")
        self.bank = torch.zeros(size, dim, dtype=dtype)
        self.ptr = 0  # next row to write
        self.count = 0  # rows filled so far (<= size)

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    def contents(self) -> torch.Tensor:
        """Filled rows, float32 [count, dim], oldest first."""
        if self.count < self.size:
            return self.bank[: self.count]
        return torch.cat([self.bank[self.ptr :], self.bank[: self.ptr]])

    def enqueue(self, emb: torch.Tensor) -> None:
        """Append float [B, dim] embeddings (detached, moved to the pool's device), dropping the
        oldest rows once full. A batch larger than the pool keeps its last ``size`` rows."""
        emb = emb.detach().to(self.bank.device, self.bank.dtype)
        if emb.shape[0] > self.size:
            emb = emb[-self.size :]
        n = emb.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.bank.device)) % self.size
        self.bank[idx] = emb
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.size, self.count + n)

    def nearest(self, query: torch.Tensor) -> torch.Tensor:
        """For each row of ``query`` [B, dim], the pool row of highest cosine similarity
        (float [B, dim], detached, on the query's device). Raises RuntimeError on an empty pool."""
        if self.count == 0:
            raise RuntimeError("the caption pool is empty; enqueue captions before querying it")
        bank = self.bank[: self.count].to(query.device, query.dtype)
        sim = F.normalize(query.detach(), dim=1) @ F.normalize(bank, dim=1).T
        return bank[sim.argmax(dim=1)].detach()

    def state_dict(self) -> dict:
        return {"bank": self.bank.clone(), "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.bank = state["bank"].clone()
        self.ptr = int(state["ptr"])
        self.count = int(state["count"])


@dataclass
class RoCLIPParams(AugOnlyParams):
    pool_size: int = param(2048, "caption pool size, in captions (paper scale: 21845 for 1M pairs)")
    match_every: int = param(2, "K: epochs with epoch % K == 0 (1-indexed) are matching epochs")
    augment: bool = param(True, "image + EDA augmentation in every epoch (False = RoCLIP without augmentation)")
    pool_update: Literal["matching", "always"] = param("matching", "when the pool receives each batch's captions: matching (the official code) or always")


@register_defense("roclip")
class RoCLIP(AugOnly):
    """RoCLIP: nearest-neighbour caption matching from a varying pool, every K epochs."""

    Params = RoCLIPParams

    def __init__(self, params: RoCLIPParams, seed: int):
        super().__init__(params, seed)
        if params.match_every < 1:
            raise ValueError(f"roclip: match_every must be >= 1, got {params.match_every}")
        if params.pool_size < 1:
            raise ValueError(f"roclip: pool_size must be >= 1, got {params.pool_size}")
        self.augment = params.augment
        self.pool: CaptionPool | None = None  # made on first use, when the embedding size is known

    def check(self, train_size: int) -> None:
        super().check(train_size)
        if self.params.pool_size > train_size:
            raise ValueError(
                f"roclip: pool_size {self.params.pool_size} exceeds the {train_size} training pairs; "
                "the pool would hold the same captions several times"
            )

    def is_matching_epoch(self, epoch: int) -> bool:
        """True when 1-indexed ``epoch`` uses the matching loss (docs/roclip-spec.md §1.5)."""
        return epoch % self.params.match_every == 0

    def start_epoch(self, state: TrainState) -> None:
        # Never match against an empty or random pool (spec §6 row 3): before a matching epoch,
        # top the pool up with embeddings of random training captions under the current model.
        if not self.is_matching_epoch(state.epoch) or state.encode_captions is None:
            return
        missing = self.params.pool_size - (self.pool.count if self.pool else 0)
        if missing > 0:
            self._enqueue(state.encode_captions(missing))

    def _enqueue(self, emb: torch.Tensor) -> None:
        if self.pool is None:
            self.pool = CaptionPool(self.params.pool_size, emb.shape[1], emb.dtype)
        self.pool.enqueue(emb)

    def loss(self, image_emb, text_emb, logit_scale, state: TrainState):
        if not self.is_matching_epoch(state.epoch):
            if self.params.pool_update == "always":
                self._enqueue(text_emb)
            return info_nce(image_emb, text_emb, logit_scale)
        if self.pool is None or self.pool.count == 0:
            self._enqueue(text_emb)  # no encode_captions hook was given: seed the pool with this batch
            return info_nce(image_emb, text_emb, logit_scale)
        matched = self.pool.nearest(image_emb)  # queried before this batch is enqueued
        self._enqueue(text_emb)
        # The 0x term keeps the text tower in the graph with zero gradient, as the official code
        # does, so AdamW's momentum and weight decay still move it (spec §1.6, §6 row 7).
        return info_nce(image_emb, matched, logit_scale) + 0.0 * info_nce(image_emb, text_emb, logit_scale)

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict()} if self.pool else {}

    def load_state_dict(self, state: dict) -> None:
        if "pool" in state:
            self.pool = CaptionPool(1, 1)
            self.pool.load_state_dict(state["pool"])
