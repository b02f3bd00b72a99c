"""SafeCLIP (Yang et al., "Better Safe than Sorry: Pre-training CLIP against Targeted Data
Poisoning and Backdoor Attacks", ICML 2024, arXiv:2310.05862) as an in-training task: it owns the
training step and splits the data every epoch (defense-spec-cleanclip-safeclip.md §3; the pieces
are in ``safeclip_core``, whose docstring lists the departures from the official code).

How it runs here (spec §3.2), with iw = ``inmodal_warmup``, mw = ``multimodal_warmup`` and E the
cell's epochs:

- epochs 1..iw: one pass over all pairs with the unimodal loss (``core.unimodal_loss``, with the
  nearest-neighbour memory banks), LR ``in_lr`` on SafeCLIP's cosine (``core.warmup_lr``);
- epochs iw+1..iw+mw: one pass over all pairs with the crossed-view CLIP loss at the constant
  ``filter_lr``;
- every later epoch: score every pair with the model as the epoch starts (eval mode, no grad,
  augmented view 1 and EDA caption 1, cosine similarity), fit a 2-component Gaussian mixture,
  split into safe and risky pairs (``core.split``: p_clean >= ``threshold`` at the first such
  epoch, then the safe fraction grows by ``safe_step`` up to ``safe_cap``), then one unimodal pass
  over the risky pairs (LR ``in_lr``) and one CLIP pass over the safe pairs (LR ``cross_lr``),
  each on its own cosine (``core.filtering_lr``).

Every step sees two SimCLR-style views of each image (RoCLIP's augmentation, ``min_crop`` its
smallest crop) and two EDA rewrites of each caption, fixed for the run (the original caption is
never trained on, S8), in one 2B forward. Loss terms in the row: ``final_loss_unimodal``,
``final_loss_clip``. Diagnostics (``d_*`` columns, one value per filtering epoch): the safe
fraction and its size, the share of clean pairs in the safe set (``safe_precision``) and of all
clean pairs that it holds (``safe_recall``), the poisoned pairs let into it (``n_poison_safe``,
``poison_in_safe``), and the AUROC of the similarity as a poison detector (``split_auroc``); the
poison flags are read for these numbers only.

Under DDP every rank scores its share of fixed chunks of the data (seeded per chunk, so the
scores do not depend on the number of processes), the scores are summed over ranks, and rank 0's
split is broadcast: every rank trains on the same safe and risky rows.

Departures for small profiles (config.py PROFILES, ``bench list profiles``): fewer warm-up epochs,
a larger ``safe_step`` (the same growth of the safe set over fewer epochs), LRs and warm-up steps
scaled to the profile, a smaller bank; see the README.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from poisonbench import distributed, wordnet
from poisonbench.augment import eda_captions, image_augmentation
from poisonbench.preprocess import normalize
from poisonbench.registry import param, register_defense
from poisonbench.utils import derive_seed

from . import safeclip_core as core
from .base import EpochContext, TaskBatch, TrainingPass, TrainingTask, TrainState

EDA_ALPHA = 0.1  # [SC] utils/augment_text.py: EDA with alpha 0.1, as CleanCLIP
UNIMODAL_GROUPS = ("unimodal", "risky")  # passes trained with the unimodal loss; "clip" and "safe" with CLIP's


@dataclass
class SafeCLIPParams:
    # Defaults: the official parser ([SC] src/parser.py) and the authors' final CC-1M runs (spec §3.8);
    # profiles scale them (config.py PROFILES).
    inmodal_warmup: int = param(5, "epochs of unimodal warm-up on all pairs, >= 0 (official 5)")
    multimodal_warmup: int = param(1, "epochs of CLIP on all pairs at filter_lr after it, >= 0 (official 1)")
    in_lr: float = param(5e-4, "peak LR of the unimodal passes (official 5e-4)")
    cross_lr: float = param(5e-4, "peak LR of the CLIP passes over the safe set (official 5e-4)")
    filter_lr: float = param(5e-6, "constant LR of the CLIP warm-up epochs (official 5e-6)")
    warmup_steps: int = param(1000, "linear warm-up steps of each cosine schedule (the authors' runs 1000; parser 10000)")
    schedule: Literal["intended", "as-run"] = param(
        "intended", "LR schedules: intended (phase-relative steps, each cosine ends at 0) or as-run (the "
        "official absolute-epoch steps: cosines start partway and pass pi); spec §3.7, §6 row 1")
    memory_bank: bool = param(True, "nearest-neighbour memory banks in the unimodal loss (the README's setting)")
    bank_size: int = param(21845, "pairs each memory bank holds (the authors' CC-1M runs: 21845 at global batch 512)")
    bank_init: Literal["normalized", "as-run"] = param(
        "normalized", "initial bank: unit random vectors, or as-run (un-normalised, lightly 1.2.39); spec §6 row 6")
    threshold: float = param(0.9, "p_clean a pair needs to be safe at the first filtering epoch, in (0, 1)")
    safe_step: float = param(0.01, "growth of the safe fraction per filtering epoch, >= 0 (official 0.01)")
    safe_cap: float = param(0.85, "largest safe fraction, in (0, 1] (official 0.85)")
    risky_pass: bool = param(True, "train the risky pairs with the unimodal loss (official; False: the "
                             "--cross_inmodal ablation)")
    min_crop: float = param(0.08, "smallest RandomResizedCrop area of the image views, in (0, 1] (official 0.08)")
    score_batch: int = param(2048, "pairs per forward when scoring the split (official eval batch 2048 per rank)")


@register_defense("safeclip")
class SafeCLIP(TrainingTask):
    """SafeCLIP: unimodal warm-up, then a per-epoch Gaussian-mixture split into safe pairs (CLIP
    loss) and risky pairs (unimodal loss); Yang et al., ICML 2024 (spec §3)."""

    Params = SafeCLIPParams
    leaderboard_metrics = {"poison_in_safe": "poisons in safe set, last epoch (%)",
                           "safe_fraction": "safe set, last epoch (%)"}

    def __init__(self, params: SafeCLIPParams, seed: int):
        super().__init__(params, seed)
        p = params
        problems = [f"{k} must be >= 0, got {getattr(p, k)}" for k in ("inmodal_warmup", "multimodal_warmup",
                                                                      "warmup_steps", "safe_step") if getattr(p, k) < 0]
        problems += [f"{k} must be a positive finite number, got {getattr(p, k)}"
                     for k in ("in_lr", "cross_lr", "filter_lr") if not (math.isfinite(getattr(p, k)) and getattr(p, k) > 0)]
        if p.bank_size < 1 or p.score_batch < 1:
            problems.append(f"bank_size and score_batch must be >= 1, got {p.bank_size}, {p.score_batch}")
        if not 0 < p.threshold < 1:
            problems.append(f"threshold must be in (0, 1), got {p.threshold}")
        if not 0 < p.safe_cap <= 1 or not 0 < p.min_crop <= 1:
            problems.append(f"safe_cap and min_crop must be in (0, 1], got {p.safe_cap}, {p.min_crop}")
        if problems:
            raise ValueError("safeclip: " + "; ".join(problems))
        banks = [core.NNMemoryBank(p.bank_size, derive_seed(seed, "safeclip-bank", m), p.bank_init) for m in ("image", "text")]
        self.banks = banks if p.memory_bank else None
        self.tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ratio: float | None = None  # the next filtering epoch's safe fraction (None before the first)
        self.total = 0.0  # the filtering schedulers' total steps, fixed at the first filtering epoch
        self.train_num_batches = 0
        self.history: dict[str, list] = {}
        self._augment = None

    def check(self, train_size: int) -> None:
        wordnet.wordnet()  # EDA needs WordNet: a missing one stops the cell before training, saying how to install it

    def check_run(self, cfg) -> None:
        if self.params.inmodal_warmup + self.params.multimodal_warmup >= cfg.epochs:
            raise ValueError(f"safeclip: its warm-up ({self.params.inmodal_warmup} unimodal + "
                             f"{self.params.multimodal_warmup} CLIP epochs) leaves no filtering epoch in {cfg.epochs} "
                             "epochs; lower inmodal_warmup/multimodal_warmup or raise --epochs")

    def prepare(self, captions: list[str], tokenizer) -> None:
        """Tokenise two independent EDA rewrites per caption, once (spec §3.3): the text views."""
        self.tokens = tuple(tokenizer(eda_captions(captions, derive_seed(self.seed, "safeclip-eda", v), EDA_ALPHA))
                            for v in (1, 2))

    def augment(self, size: int):
        if self._augment is None or self._augment[0] != size:
            self._augment = (size, image_augmentation(size, self.params.min_crop))
        return self._augment[1]

    # --- the epoch's passes ---------------------------------------------------------------------

    def plan_epoch(self, epoch: int, ctx: EpochContext) -> list[TrainingPass]:
        """The passes of ``epoch`` (spec §3.2, S1): warm-up passes over all rows, or the split's
        risky then safe passes, each with its learning rates."""
        p, nb = self.params, ctx.steps_per_epoch
        iw, mw = p.inmodal_warmup, p.multimodal_warmup
        every = torch.arange(len(ctx.data))
        if epoch <= iw + mw:
            group = "unimodal" if epoch <= iw else "clip"
            return [TrainingPass(group, every, lambda b, n: core.warmup_lr(
                epoch, b, nb, iw, mw, p.in_lr, p.filter_lr, p.warmup_steps, p.schedule))]
        first, filtering = iw + mw + 1, ctx.epochs - iw - mw
        similarity = self.similarities(ctx, epoch)
        safe, risky, ratio = core.split(similarity, None if epoch == first else self.ratio, p.threshold)
        safe, risky = self._same_on_every_rank(safe, len(similarity), ctx.device)
        if epoch == first:
            self.total = core.filtering_total(nb, ratio, filtering, p.safe_step)
            self.train_num_batches = math.floor(self.total / filtering)
        self.ratio = core.next_ratio(ratio, p.safe_step, p.safe_cap)
        self.record(epoch, ratio, safe, similarity, ctx.data.is_poison)
        passes = []
        if p.risky_pass:
            passes.append(TrainingPass("risky", risky, lambda b, n: core.filtering_lr(
                epoch, b, n, first, p.in_lr, p.warmup_steps, self.total, p.schedule)))
        passes.append(TrainingPass("safe", safe, lambda b, n: core.filtering_lr(
            epoch, b, self.train_num_batches, first, p.cross_lr, p.warmup_steps, self.total, p.schedule)))
        return passes

    @torch.no_grad()
    def similarities(self, ctx: EpochContext, epoch: int) -> np.ndarray:
        """Cosine similarity of each pair's augmented view 1 and EDA caption 1 under the model as
        the epoch starts, in eval mode (spec §3.6 step 1, S4): float32 [N]. Chunks of
        ``score_batch`` rows, each augmented from a seed of its own and scored by one rank."""
        model, n = ctx.model, len(ctx.data)
        model.eval()
        out = torch.zeros(n, device=ctx.device)
        world, rank = distributed.world_size(), distributed.rank()
        for c, start in enumerate(range(0, n, self.params.score_batch)):
            if c % world != rank:
                continue
            rows = torch.arange(start, min(n, start + self.params.score_batch))
            images = ctx.data.images[rows].to(ctx.device).float() / 255.0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "safeclip-score", epoch, c))
                x = self.augment(ctx.image_size)(images)
            img, txt, _ = model(normalize(x), self.tokens[0][rows].to(ctx.device))
            out[rows.to(ctx.device)] = F.cosine_similarity(img.float(), txt.float())
        return distributed.all_reduce_sum_(out).cpu().numpy().astype(np.float32)

    @staticmethod
    def _same_on_every_rank(safe: np.ndarray, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0's split on every rank (the scores are the same everywhere; this makes sure), as
        sorted safe and risky rows int64 (the trainer shuffles each pass). ``device``: the model's,
        where a collective's tensor must be (CUDA under nccl)."""
        mask = torch.zeros(n, dtype=torch.uint8)
        mask[torch.as_tensor(safe, dtype=torch.int64)] = 1
        if distributed.world_size() > 1:
            mask = distributed.broadcast_(mask.to(device)).cpu()
        return torch.nonzero(mask.bool()).flatten(), torch.nonzero(~mask.bool()).flatten()

    def record(self, epoch: int, ratio: float, safe: torch.Tensor, similarity: np.ndarray, is_poison: torch.Tensor) -> None:
        """This filtering epoch's diagnostics (``metrics``); the poison flags are read for them only."""
        poison = is_poison.bool()
        in_safe = torch.zeros(len(poison), dtype=torch.bool)
        in_safe[safe] = True
        n_clean, n_poison = int((~poison).sum()), int(poison.sum())
        clean_safe = int((in_safe & ~poison).sum())
        values = {"filter_epoch": epoch, "safe_fraction": ratio, "n_safe": int(in_safe.sum()),
                  "safe_precision": clean_safe / max(1, int(in_safe.sum())), "safe_recall": clean_safe / max(1, n_clean)}
        if n_poison:
            from sklearn.metrics import roc_auc_score

            n_poison_safe = int((in_safe & poison).sum())
            values.update(n_poison_safe=n_poison_safe, poison_in_safe=n_poison_safe / n_poison,
                          split_auroc=float(roc_auc_score(poison.numpy(), -similarity.astype(np.float64))))
        for k, v in values.items():
            self.history.setdefault(k, []).append(v)

    # --- the step -------------------------------------------------------------------------------

    def step(self, model, batch: TaskBatch, state: TrainState) -> dict[str, torch.Tensor]:
        """One 2B forward of two image views and two EDA captions (spec §3.3); the unimodal loss in
        the "unimodal" and "risky" passes, the crossed CLIP loss in the "clip" and "safe" ones."""
        if self.tokens is None:
            raise RuntimeError("safeclip: prepare() must run before the first step")
        if state.group not in ("unimodal", "risky", "clip", "safe"):
            raise RuntimeError(f"safeclip: a step outside its planned passes (group {state.group!r})")
        b = len(batch.images)
        images = batch.images.to(batch.device).float() / 255.0
        x = self.augment(batch.image_size)(torch.cat([images, images]))  # an independent draw per image and view
        tokens = torch.cat([self.tokens[0][batch.rows], self.tokens[1][batch.rows]]).to(batch.device)
        img, txt, scale = model(normalize(x), tokens)
        i1, t1 = distributed.gather_with_grad(img[:b].float(), txt[:b].float())
        i2, t2 = distributed.gather_with_grad(img[b:].float(), txt[b:].float())
        s = scale.float()
        if state.group in UNIMODAL_GROUPS:
            banks = self.banks or (None, None)
            return {"unimodal": core.unimodal_loss(i1, t1, i2, t2, s, *banks)}
        return {"clip": core.clip_loss(i1, t1, i2, t2, s)}

    # --- numbers and state ----------------------------------------------------------------------

    def metrics(self) -> dict[str, float | int | list]:
        out: dict[str, float | int | list] = {k: list(v) for k, v in self.history.items()}
        if self.history.get("safe_fraction"):
            out["first_safe_fraction"] = self.history["safe_fraction"][0]
        return out

    def state_dict(self) -> dict:
        return {"ratio": -1.0 if self.ratio is None else self.ratio, "total": self.total,
                "train_num_batches": self.train_num_batches, "history": {k: list(v) for k, v in self.history.items()},
                "banks": [bank.state_dict() for bank in self.banks] if self.banks else []}

    def load_state_dict(self, state: dict) -> None:
        ratio = float(state.get("ratio", -1.0))
        self.ratio = None if ratio < 0 else ratio
        self.total = float(state.get("total", 0.0))
        self.train_num_batches = int(state.get("train_num_batches", 0))
        self.history = {k: list(v) for k, v in state.get("history", {}).items()}
        for bank, saved in zip(self.banks or [], state.get("banks", [])):
            bank.load_state_dict(saved)
