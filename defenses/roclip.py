"""RoCLIP (Yang, Gao, Mirzasoleiman, NeurIPS 2023, arXiv:2303.06854), per docs/roclip-spec.md §1 and §6.

A FIFO pool of detached, normalised caption embeddings. On matching epochs (1-indexed epochs
with ``epoch % match_every == 0``; epoch 1 is always plain CLIP) each image is paired with its
nearest pool caption by cosine similarity, queried before the current batch is enqueued, and the
loss is the in-batch symmetric InfoNCE between images and their matched captions. Other epochs
use the CLIP loss. Image and EDA augmentation apply in every epoch (as aug-only).
"""
from __future__ import annotations

import dataclasses
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
        self.rows = torch.full((size,), -1, dtype=torch.int64)  # each entry's training row (-1: unknown); diagnostics
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

    def enqueue(self, emb: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Append float [B, dim] embeddings (detached, moved to the pool's device), dropping the
        oldest rows once full. A batch larger than the pool keeps its last ``size`` rows.
        ``rows``: int64 [B], the training row of each caption (for diagnostics), else unknown."""
        emb = emb.detach().to(self.bank.device, self.bank.dtype)
        rows = torch.full((len(emb),), -1, dtype=torch.int64) if rows is None else rows.detach().cpu().long()
        if emb.shape[0] > self.size:
            emb, rows = emb[-self.size :], rows[-self.size :]
        n = emb.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.bank.device)) % self.size
        self.bank[idx] = emb
        self.rows[idx.cpu()] = rows
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.size, self.count + n)

    def nearest_index(self, query: torch.Tensor) -> torch.Tensor:
        """For each row of ``query`` [B, dim], the index (int64 [B], on the query's device) of the
        pool entry of highest cosine similarity. Raises RuntimeError on an empty pool."""
        if self.count == 0:
            raise RuntimeError("the caption pool is empty; enqueue captions before querying it")
        bank = self.bank[: self.count].to(query.device, query.dtype)
        sim = F.normalize(query.detach(), dim=1) @ F.normalize(bank, dim=1).T
        return sim.argmax(dim=1)

    def nearest(self, query: torch.Tensor) -> torch.Tensor:
        """For each row of ``query`` [B, dim], the pool entry of highest cosine similarity
        (float [B, dim], detached, on the query's device). Raises RuntimeError on an empty pool."""
        return self.bank[self.nearest_index(query).to(self.bank.device)].to(query.device, query.dtype).detach()

    def state_dict(self) -> dict:
        return {"bank": self.bank.clone(), "rows": self.rows.clone(), "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.bank = state["bank"].clone()
        self.rows = state["rows"].clone() if "rows" in state else torch.full((len(self.bank),), -1, dtype=torch.int64)
        self.ptr = int(state["ptr"])
        self.count = int(state["count"])


class MatchingDiagnostics:
    """What RoCLIP's nearest-neighbour matching did, per matching epoch (issue 17), from the
    training rows' facts (``DiagnosticRows``; never acted on):

    - ``match_own_class``: share of the labelled images whose matched pool caption comes from a
      row of the image's own class (entries of unknown row or class are left out);
    - ``match_distinct``: mean number of distinct pool entries matched per batch (of B images);
    - ``match_poison_to_target``: share of the poisoned images whose matched caption names the
      attack's target label (the backdoor's link kept through the pool); when the attack has one.

    ``record`` accumulates a batch; ``close`` ends the epoch's record. State is plain lists and
    numbers (checkpointed with the pool), so a resumed run reports every matching epoch.
    """

    KEYS = ("match_epoch", "match_own_class", "match_distinct", "match_poison_to_target")

    def __init__(self):
        self.info = None
        self.done: dict[str, list] = {k: [] for k in self.KEYS}
        self.open: dict[str, float] = {}

    def record(self, epoch: int, rows: torch.Tensor, matched_rows: torch.Tensor, matched_index: torch.Tensor) -> None:
        """One batch: the images' training rows and their matched entries' rows (int64 [B], -1
        unknown) and pool indices (int64 [B])."""
        if self.info is None or rows is None:
            return
        if self.open.get("epoch") != epoch:
            self.close()
            self.open = dict.fromkeys(("own", "labelled", "distinct", "batches", "poison", "poison_target"), 0.0)
            self.open["epoch"] = epoch
        labels, o = self.info.labels, self.open
        rows, matched_rows = rows.cpu(), matched_rows.cpu()
        known = (matched_rows >= 0) & (labels[rows] >= 0)
        known &= labels[matched_rows.clamp_min(0)] >= 0
        o["labelled"] += int(known.sum())
        o["own"] += int((known & (labels[rows] == labels[matched_rows.clamp_min(0)])).sum())
        o["distinct"] += len(torch.unique(matched_index))
        o["batches"] += 1
        if self.info.names_target is not None:
            poison = self.info.is_poison[rows] & (matched_rows >= 0)
            o["poison"] += int(poison.sum())
            o["poison_target"] += int((poison & self.info.names_target[matched_rows.clamp_min(0)]).sum())

    def close(self) -> None:
        """End the open epoch's record (if any)."""
        o = self.open
        if not o.get("batches"):
            return
        self.done["match_epoch"].append(int(o["epoch"]))
        self.done["match_own_class"].append(o["own"] / o["labelled"] if o["labelled"] else float("nan"))
        self.done["match_distinct"].append(o["distinct"] / o["batches"])
        if self.info.names_target is not None:
            self.done["match_poison_to_target"].append(o["poison_target"] / o["poison"] if o["poison"] else float("nan"))
        self.open = {}

    def metrics(self) -> dict[str, list]:
        self.close()
        return {k: v for k, v in self.done.items() if v and all(x == x for x in v)}  # no NaN list

    def state_dict(self) -> dict:
        return {"done": {k: list(v) for k, v in self.done.items()}, "open": dict(self.open)}

    def load_state_dict(self, state: dict) -> None:
        self.done = {k: list(state["done"].get(k, [])) for k in self.KEYS}
        self.open = dict(state["open"])


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
    leaderboard_metrics = {"match_own_class": "own-class matches, last matching epoch (%)"}

    def __init__(self, params: RoCLIPParams, seed: int):
        super().__init__(params, seed)
        if params.match_every < 1:
            raise ValueError(f"roclip: match_every must be >= 1, got {params.match_every}")
        if params.pool_size < 1:
            raise ValueError(f"roclip: pool_size must be >= 1, got {params.pool_size}")
        self.augment = params.augment
        self.pool: CaptionPool | None = None  # made on first use, when the embedding size is known
        self.diagnostics = MatchingDiagnostics()

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
            self._enqueue(*state.encode_captions(missing, with_rows=True))

    def _enqueue(self, emb: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        if self.pool is None:
            self.pool = CaptionPool(self.params.pool_size, emb.shape[1], emb.dtype)
        self.pool.enqueue(emb, rows)

    def observe(self, rows) -> None:
        self.diagnostics.info = rows

    def loss(self, image_emb, text_emb, logit_scale, state: TrainState):
        if state.rows is not None and len(state.rows) != len(text_emb):  # embeddings not of the global batch
            state = dataclasses.replace(state, rows=None)
        if not self.is_matching_epoch(state.epoch):
            if self.params.pool_update == "always":
                self._enqueue(text_emb, state.rows)
            return info_nce(image_emb, text_emb, logit_scale)
        if self.pool is None or self.pool.count == 0:
            self._enqueue(text_emb, state.rows)  # no encode_captions hook was given: seed the pool with this batch
            return info_nce(image_emb, text_emb, logit_scale)
        index = self.pool.nearest_index(image_emb)  # queried before this batch is enqueued
        matched = self.pool.bank[index.to(self.pool.bank.device)].to(image_emb.device, image_emb.dtype).detach()
        self.diagnostics.record(state.epoch, state.rows, self.pool.rows[index.cpu()], index)
        self._enqueue(text_emb, state.rows)
        # The 0x term keeps the text tower in the graph with zero gradient, as the official code
        # does, so AdamW's momentum and weight decay still move it (spec §1.6, §6 row 7).
        return info_nce(image_emb, matched, logit_scale) + 0.0 * info_nce(image_emb, text_emb, logit_scale)

    def metrics(self) -> dict[str, list]:
        """The matching diagnostics (``MatchingDiagnostics``), one value per matching epoch."""
        return self.diagnostics.metrics()

    def state_dict(self) -> dict:
        out = {"diagnostics": self.diagnostics.state_dict()}
        return {"pool": self.pool.state_dict(), **out} if self.pool else out

    def load_state_dict(self, state: dict) -> None:
        if "pool" in state:
            self.pool = CaptionPool(1, 1)
            self.pool.load_state_dict(state["pool"])
        if "diagnostics" in state:
            self.diagnostics.load_state_dict(state["diagnostics"])
