"""SafeCLIP's pieces (Yang et al., ICML 2024, arXiv:2310.05862), as the official code runs them
(../shared/reference/defense-spec-cleanclip-safeclip.md §3, cited as "spec §3.x"; [SC] is
BigML-CS-UCLA/SafeCLIP @ 91488ce3): the two losses, the nearest-neighbour memory bank, the
Gaussian-mixture split into safe and risky pairs, the safe-fraction schedule and the learning-rate
schedules. Pure functions of tensors and numbers; ``safeclip.py`` runs them in the trainer.

Departures from the official code, each deliberate (spec §6):

- The memory bank starts from L2-normalised random vectors (``bank_init="normalized"``, spec §6
  row 6); the official lightly 1.2.39 bank starts un-normalised (``"as-run"``), which inflates the
  logits of the first ceil(size / batch) unimodal steps.
- The safe order sorts by (p_clean desc, similarity desc, row asc), so ties of the float32
  posteriors break deterministically (spec §3.6 [SIM], §6 row 8); the official unstable argsort
  orders them arbitrarily.
- The safe fraction is a float64; the official one is a float32 tensor, whose floor(N·r) can
  differ by one pair.
- Schedules: ``"intended"`` (phase-relative steps, the cosine stops at 0) by default,
  ``"as-run"`` reproduces the official absolute-epoch steps (spec §3.7, §3.10 quirk 1, §6 row 1).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Schedule = Literal["intended", "as-run"]
SCHEDULES = ("intended", "as-run")
BankInit = Literal["normalized", "as-run"]


def _ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against its own column (targets arange(N)), mean over rows."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def clip_loss(i1: torch.Tensor, t1: torch.Tensor, i2: torch.Tensor, t2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """SafeCLIP's CLIP loss on crossed views (spec §3.4b; [SC] src/train.py:59-62, 79-80):
    ½[CE(s·I₁T₂ᵀ) + CE(s·T₁I₂ᵀ)], two different N x N matrices (not a transpose pair); it is the
    standard symmetric CLIP loss when the views coincide (S7).

    Args: i1, i2: float [N, D] L2-normalised embeddings of the two augmented image views; t1, t2:
    float [N, D] those of the two EDA captions; scale: the scalar s = exp(logit_scale).
    Returns a float scalar."""
    return 0.5 * (_ce(scale * i1 @ t2.t()) + _ce(scale * t1 @ i2.t()))


def unimodal_loss(i1: torch.Tensor, t1: torch.Tensor, i2: torch.Tensor, t2: torch.Tensor, scale: torch.Tensor,
                  image_bank: "NNMemoryBank | None" = None, text_bank: "NNMemoryBank | None" = None) -> torch.Tensor:
    """SafeCLIP's unimodal contrastive loss (spec §3.4a; [SC] src/train.py:49-58, 74-77).

    With the banks (the README setting): ½[CE(s·I₂·NN_I(I₁)ᵀ) + CE(s·T₂·NN_T(T₁)ᵀ)], where NN_X(q)
    is q's nearest neighbour in modality X's bank, queried before the bank takes in the view-1
    embeddings (S5, S6); the gradient flows through the view-2 embeddings and s only. Without
    them: ½[CE(s·I₂I₁ᵀ) + CE(s·T₂T₁ᵀ)] (S9). One direction only; rows are view 2.

    Args as ``clip_loss``; the banks are both given or both None. Returns a float scalar.
    Raises ValueError when only one bank is given."""
    if (image_bank is None) != (text_bank is None):
        raise ValueError("unimodal_loss needs both memory banks or neither")
    if image_bank is not None:
        i1, t1 = image_bank.query(i1), text_bank.query(t1)
    return 0.5 * (_ce(scale * i2 @ i1.t()) + _ce(scale * t2 @ t1.t()))


class NNMemoryBank:
    """A nearest-neighbour memory bank of one modality (spec §3.5; lightly's
    ``NNMemoryBankModule`` as [SC] src/memory_bank.py uses it).

    ``query(x)`` returns, for each row of ``x``, the bank row of largest cosine similarity
    (argmax, first on ties), from the bank as it was *before* ``x`` is enqueued; then it enqueues
    ``x`` (detached): a FIFO pointer writes rows ptr.., and when ptr + B >= size only size - ptr
    rows are written, the rest of the batch is dropped, and the pointer returns to 0.

    Args:
        size: rows held, >= 1. seed: seeds the initial content. init: ``"normalized"`` (unit
            random vectors; the default, spec §6 row 6) or ``"as-run"`` (standard normal
            vectors, un-normalised, as lightly 1.2.39 left them).
    The bank (float [size, D]) is created at the first query, with D and device from it.
    """

    def __init__(self, size: int, seed: int, init: BankInit = "normalized"):
        if size < 1:
            raise ValueError(f"memory bank size must be >= 1, got {size}")
        if init not in ("normalized", "as-run"):
            raise ValueError(f"unknown memory bank init {init!r}; valid: normalized, as-run")
        self.size, self.seed, self.init = size, seed, init
        self.bank: torch.Tensor | None = None
        self.ptr = 0

    def _start(self, dim: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(self.seed)
        bank = torch.randn(self.size, dim, generator=g)
        self.bank = (F.normalize(bank, dim=1) if self.init == "normalized" else bank).to(device)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest neighbours float [B, D] (no gradient) of ``x`` float [B, D]; then enqueue ``x``."""
        if self.bank is None:
            self._start(x.shape[1], x.device)
        self.bank = self.bank.to(x.device)  # a bank restored from a checkpoint comes back on the CPU
        bank = self.bank.clone()
        self.enqueue(x)
        sim = F.normalize(x.detach().float(), dim=1) @ F.normalize(bank.float(), dim=1).t()
        return bank[sim.argmax(dim=1)].to(x.dtype)

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Write ``x`` (detached) at the pointer, FIFO with overflow drop (lightly's
        ``_dequeue_and_enqueue``)."""
        if self.bank is None:
            self._start(x.shape[1], x.device)
        b = len(x)
        if self.ptr + b >= self.size:
            self.bank[self.ptr:] = x[: self.size - self.ptr].detach().to(self.bank.dtype)
            self.ptr = 0
        else:
            self.bank[self.ptr:self.ptr + b] = x.detach().to(self.bank.dtype)
            self.ptr += b

    def state_dict(self) -> dict:
        return {"bank": None if self.bank is None else self.bank.cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.bank = None if state.get("bank") is None else state["bank"].to(device)
        self.ptr = int(state.get("ptr", 0))


def clean_probability(similarity: np.ndarray) -> np.ndarray:
    """p_clean of each pair (spec §3.6 step 2, S3; [SC] src/samplers.py:135-161): the posterior
    of the component with the larger mean of ``sklearn.mixture.GaussianMixture(n_components=2,
    random_state=0)`` (sklearn's other defaults: full covariance, k-means init, n_init 1, tol
    1e-3, max_iter 100), fitted on the 1-D image-caption cosine similarities, float [N] (N >= 2),
    as given (float32 in the official run). Returns float [N] in [0, 1]."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(similarity).reshape(-1, 1)
    if len(x) < 2:
        raise ValueError(f"the split's Gaussian mixture needs at least 2 pairs, got {len(x)}")
    gmm = GaussianMixture(n_components=2, random_state=0).fit(x)
    return gmm.predict_proba(x)[:, int(np.argmax(gmm.means_))]


def clean_order(similarity: np.ndarray, p_clean: np.ndarray) -> np.ndarray:
    """Rows from most to least likely clean: p_clean descending, then similarity descending,
    then row ascending (spec §6 row 8: the official argsort of float32 posteriors is unstable).
    Returns int64 [N]."""
    sim = np.asarray(similarity, dtype=np.float64)
    p = np.asarray(p_clean, dtype=np.float64)
    return np.lexsort((np.arange(len(p)), -sim, -p)).astype(np.int64)


def split(similarity: np.ndarray, ratio: float | None, threshold: float = 0.9) -> tuple[np.ndarray, np.ndarray, float]:
    """The safe and risky rows of one filtering epoch (spec §3.6 steps 2-3, S2).

    ``ratio`` None (the first filtering epoch): safe = the pairs with p_clean >= ``threshold``,
    and the safe fraction is |safe| / N. Otherwise safe = the first floor(N · ratio) pairs in
    ``clean_order``. Risky = the rest; safe and risky partition range(N).

    Args: similarity float [N]; ratio in [0, 1] or None; threshold in (0, 1).
    Returns (safe rows int64, risky rows int64, the safe fraction used)."""
    n = len(similarity)
    p = clean_probability(similarity)
    order = clean_order(similarity, p)
    if ratio is None:
        safe_mask = p[order] >= threshold
        safe, risky = order[safe_mask], order[~safe_mask]
        return safe, risky, float(safe_mask.sum()) / n
    k = math.floor(n * ratio)
    return order[:k], order[k:], float(ratio)


def next_ratio(ratio: float, step: float = 0.01, cap: float = 0.85) -> float:
    """The next epoch's safe fraction: min(ratio + step, cap) (spec §3.6 step 4, S2; [SC]
    src/main.py:215). A first fraction above ``cap`` shrinks to it."""
    return min(ratio + step, cap)


def cosine_lr(k: float, base: float, warmup: int, total: float, clamp: bool) -> float:
    """SafeCLIP's ``cosine_scheduler`` at scheduler step ``k`` ([SC] src/scheduler.py:21-35):
    base·(k+1)/warmup while k < warmup, then ½(1 + cos(π (k - warmup) / (total - warmup)))·base.
    ``clamp``: stop the cosine at π (0), as the intended schedule does; unclamped, it rises
    again past ``total`` as the official run does."""
    if k < warmup:
        return base * (k + 1) / warmup
    progress = (k - warmup) / max(1e-12, total - warmup)
    if clamp:
        progress = min(1.0, progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base


def warmup_lr(epoch: int, index: int, steps_per_epoch: int, inmodal_warmup: int, multimodal_warmup: int,
              in_lr: float, filter_lr: float, warmup_steps: int, schedule: Schedule = "intended") -> float:
    """The LR of batch ``index`` (0-indexed) of warm-up epoch ``epoch`` (1-indexed, <= iw + mw)
    (spec §3.7, S1, S10): epochs 1..iw (unimodal) follow ``cosine_lr`` with base ``in_lr`` and
    total steps_per_epoch·(iw + mw) at k = steps_per_epoch·epoch + index (``"as-run"``, so the
    cosine ends at epoch iw) or steps_per_epoch·(epoch - 1) + index (``"intended"``); epochs
    iw+1..iw+mw (CLIP) run at the constant ``filter_lr``."""
    _check_schedule(schedule)
    if epoch > inmodal_warmup:
        return filter_lr
    k = steps_per_epoch * (epoch if schedule == "as-run" else epoch - 1) + index
    return cosine_lr(k, in_lr, warmup_steps, steps_per_epoch * (inmodal_warmup + multimodal_warmup),
                     clamp=schedule == "intended")


def filtering_total(steps_per_epoch: int, first_ratio: float, filtering_epochs: int, step: float = 0.01) -> float:
    """The phase-C schedulers' total steps (spec §3.7; [SC] src/scheduler.py ``calcualte_num_batches``
    with ``loader_update_freq`` 1): steps_per_epoch · Σ_{i=0}^{U-1} (first_ratio + step·i), U the
    filtering epochs; it ignores the cap."""
    return sum((first_ratio + step * i) * steps_per_epoch for i in range(filtering_epochs))


def filtering_lr(epoch: int, index: int, batches: int, first_filtering_epoch: int, base: float, warmup_steps: int,
                 total: float, schedule: Schedule = "intended") -> float:
    """The LR of batch ``index`` of a filtering epoch's pass (spec §3.7, S10; [SC]
    src/train.py:101-104): ``cosine_lr`` at k = batches·epoch + index (``"as-run"``: the
    absolute epoch index, so the cosine starts partway and passes π) or batches·(epoch -
    first_filtering_epoch) + index (``"intended"``: phase-relative, stops at 0). ``batches``:
    the risky pass's batches this epoch for the risky pass (base ``in_lr``), the fixed
    ``train_num_batches`` = floor(total / U) for the safe pass (base ``cross_lr``)."""
    _check_schedule(schedule)
    k = batches * (epoch if schedule == "as-run" else epoch - first_filtering_epoch) + index
    return cosine_lr(k, base, warmup_steps, total, clamp=schedule == "intended")


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown SafeCLIP schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
