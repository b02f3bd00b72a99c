"""CleanCLIP (Bansal et al., ICCV 2023, arXiv:2303.03323) as a post-training repair: the cached
undefended (poisoned) model is fine-tuned on the dataset's clean fine-tuning split with the CLIP
loss plus the in-modal self-supervised terms (defense-spec-cleanclip-safeclip.md §2; the pieces
are in ``cleanclip_core``, whose docstring lists their departures from the official code).

How it runs here: the runner loads the cached undefended model and its AdamW's final state
(``RESULTS/cache/<clip run_id>/``), and the trainer runs the fine-tuning phase (``phase``) with
``CleanCLIPTask``: one 2B forward of the original and AutoAugment views and of the captions and
their EDA rewrites per step, the loss terms ``clip`` and ``inmodal`` (row columns
``final_loss_clip``, ``final_loss_inmodal``), CleanCLIP's schedule (``lr_lambda``, mode
``schedule``) and the restored optimizer state (``start_optimizer``; ``d_restored_optimizer``
says whether it was restored).

Departures from the official code beyond ``cleanclip_core``'s (AutoAugment on the stored tensor,
``gather_with_grad``, seeded EDA):

- The schedule defaults to ``intended`` (warm-up, cosine to 0 at the last step, as written), not
  the official off-by-one (``schedule="as-run"``), spec §6 row 1.
- Precision: the official forward runs in fp32 (only loss, backward and step under autocast, spec
  §2.3). Here the step runs inside the trainer's autocast like every defense's, i.e. bf16 on
  CUDA (the undefended model was trained so too; fp32 on CPU); the loss terms are computed in
  fp32 from the embeddings.
- The recipe is scaled to the profile (config.py PROFILES, ``bench list profiles``); the defaults
  below are the README's single-GPU recipe, used by the ``paper`` profile.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from poisonbench import wordnet
from poisonbench.registry import param, register_defense
from poisonbench.utils import derive_seed

from . import cleanclip_core as core
from .base import PhaseSettings, PostTrainingRepair, TaskBatch, TrainingTask, TrainState


@dataclass
class CleanCLIPParams:
    # Defaults: the README fine-tuning recipe ([CC] README.md:85-94; spec §2.4), one GPU; the
    # paper profile uses them. Profiles scale epochs/batch/lr/warm-up (config.py PROFILES, shown
    # by `bench list profiles`): see the reasons there.
    clip_weight: float = param(1.0, "λ_clip: weight of the multimodal CLIP loss, >= 0 (official 1)")
    inmodal_weight: float = param(1.0, "λ_ss: weight of the in-modal self-supervised loss, >= 0 (official 1)")
    epochs: int = param(10, "fine-tuning epochs over the clean split (official 10)")
    lr: float = param(1e-5, "peak AdamW learning rate of the fine-tuning (official 1e-5, for a converged RN50)")
    batch_size: int = param(64, "fine-tuning batch per process (official 64 on one GPU)")
    warmup_steps: int = param(50, "linear warm-up steps before the cosine decay (official 50)")
    schedule: Literal["intended", "as-run"] = param(
        "intended", "LR schedule: intended (as written) or as-run (the official off-by-one: no warm-up, "
        "one epoch ahead, the cosine passes pi in the last epoch); spec §2.4, §6 row 1")
    restore_optimizer: bool = param(
        True, "start from the undefended model's AdamW state, as the official code does (spec §2.4, §6 row 2); "
        "False, or a cached model without it, starts a fresh AdamW")


FINETUNE_PHASE = "finetune"  # the phase's name in its checkpoint and seed stream


class CleanCLIPTask(TrainingTask):
    """The forward pass of one fine-tuning step: one 2B forward of the original and augmented
    views, and CleanCLIP's two loss terms ``{"clip", "inmodal"}`` (already weighted)."""

    name = "cleanclip"

    def __init__(self, params: CleanCLIPParams, seed: int):
        super().__init__(params, seed)
        self.eda_tokens: torch.Tensor | None = None
        self.restored_optimizer = 0

    def check(self, train_size: int) -> None:
        wordnet.wordnet()  # a missing WordNet stops the cell before training, saying how to install it

    def prepare(self, captions: list[str], tokenizer) -> None:
        """Tokenise one EDA rewrite per caption of the clean split, once (spec §2.2, C7)."""
        self.eda_tokens = tokenizer(core.text_views(captions, derive_seed("eda", self.seed)))

    def step(self, model, batch: TaskBatch, state: TrainState) -> dict[str, torch.Tensor]:
        if self.eda_tokens is None:
            raise RuntimeError("cleanclip: prepare() must run before the first step")
        i, t, ia, ta, s = core.two_view_forward(model, batch.images, batch.tokens, self.eda_tokens[batch.rows],
                                                batch.image_size, batch.device)
        p = self.params
        return core.cleanclip_losses(i.float(), t.float(), ia.float(), ta.float(), s.float(), p.clip_weight, p.inmodal_weight)

    def lr_lambda(self, warmup_steps: int, steps_per_epoch: int, epochs: int):
        """The phase's LR multiplier per 0-indexed step (``cleanclip_core.lr_lambda``, mode ``schedule``)."""
        return core.lr_lambda(warmup_steps, steps_per_epoch, epochs, self.params.schedule)

    def start_optimizer(self, optimizer: torch.optim.Optimizer, cached_state: dict | None) -> None:
        """Called once on the phase's fresh AdamW (not when resuming the phase's own checkpoint):
        restore the undefended model's optimizer state when ``restore_optimizer`` (C9)."""
        if not self.params.restore_optimizer:
            return
        if cached_state is None:
            warnings.warn("cleanclip: the cached undefended model has no optimizer state; fine-tuning starts "
                          "from a fresh AdamW (restored_optimizer = 0 in the row)")
            return
        core.restore_optimizer_state_(optimizer, cached_state)
        self.restored_optimizer = 1

    def metrics(self) -> dict[str, float | int | list]:
        return {"restored_optimizer": self.restored_optimizer}

    def state_dict(self) -> dict:
        return {"restored_optimizer": self.restored_optimizer}

    def load_state_dict(self, state: dict) -> None:
        self.restored_optimizer = int(state.get("restored_optimizer", 0))


@register_defense("cleanclip")
class CleanCLIP(PostTrainingRepair):
    """CleanCLIP: fine-tune the poisoned model on clean pairs with λ_clip·L_CLIP + λ_ss·L_SS."""

    Params = CleanCLIPParams

    def __init__(self, params: CleanCLIPParams, seed: int):
        super().__init__(params, seed)
        for name in ("epochs", "batch_size"):
            if getattr(params, name) < 1:
                raise ValueError(f"cleanclip: {name} must be >= 1, got {getattr(params, name)}")
        if not params.lr > 0:
            raise ValueError(f"cleanclip: lr must be > 0, got {params.lr}")
        if params.warmup_steps < 0:
            raise ValueError(f"cleanclip: warmup_steps must be >= 0, got {params.warmup_steps}")
        if params.clip_weight < 0 or params.inmodal_weight < 0 or params.clip_weight + params.inmodal_weight == 0:
            raise ValueError(f"cleanclip: the weights must be >= 0 and not both 0, got clip_weight="
                             f"{params.clip_weight}, inmodal_weight={params.inmodal_weight}")
        self.task = CleanCLIPTask(params, seed)

    def check(self, train_size: int) -> None:
        self.task.check(train_size)

    def phase(self, cfg) -> PhaseSettings:
        """The fine-tuning phase: this defense's epochs, lr, batch and warm-up (profile-scaled
        through its parameters), the profile's AdamW weight decay (official 0.1 in both phases)."""
        p = self.params
        return PhaseSettings(FINETUNE_PHASE, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
                             warmup_steps=p.warmup_steps, weight_decay=cfg.weight_decay)

    def training(self) -> CleanCLIPTask:
        return self.task

    def metrics(self) -> dict[str, float | int | list]:
        return self.task.metrics()
