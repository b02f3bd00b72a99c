"""The defense interfaces: one registry (``register_defense``) for every kind of defense, each kind
a small interface of its own (docs/DESIGN.md, "Registries" and "Defenses come in kinds").

The kinds follow trojanzoo's taxonomy of backdoor defenses (abstract bases per kind, each with its
standard entry point and metrics: ``trojanvision/defenses/abstract.py``, training filtering /
model inspection / input filtering; BackdoorBench's defense and detection folders), plus the
in-training task of open_clip (``src/open_clip/task/``, a ``TrainingTask`` owns the forward pass
and returns named losses):

- ``Defense`` (``kind = "training"``): hooks into the one training loop (clip, aug-only, roclip);
- ``TrainingTask`` (``kind = "task"``): owns the forward pass of a batch, returns named losses;
- ``DataFilter`` (``kind = "filter"``): scores every training pair with the cached undefended
  model, keeps the unsuspicious ones; the cell then trains the undefended CLIP on them;
- ``PostTrainingRepair`` (``kind = "repair"``): fine-tunes the cached undefended model on the
  dataset's clean fine-tuning split through the same training loop, in a phase of its own.

Every kind has ``metrics()``: numbers the runner stores in the cell's row as ``d_<key>``.
The runner dispatches on ``kind``; it never names a defense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from poisonbench.losses import info_nce

# Registered name of the undefended baseline (plain CLIP, ``defenses/clip.py``): the defense whose
# cell trains the cached undefended model that filters score with and repairs start from, and
# whose hooks train the model on a filter's kept pairs. Kept here, beside the kinds that need it,
# so that the engine never names a defense.
UNDEFENDED = "clip"

KINDS = ("training", "task", "filter", "repair")


@dataclass
class TrainState:
    """Where training stands when a defense hook is called.

    Attributes:
        epoch: 1-indexed epoch (of the phase being trained).
        step: global optimizer step, 0-indexed.
        encode_captions: function n -> float [n, D] L2-normalised text embeddings (no gradient) of
            n training captions drawn at random, for defenses that need a warm caption pool; with
            ``with_rows=True`` it returns (embeddings, int64 [n] their training rows).
        group: the pass of the epoch the step belongs to, as a ``TrainingTask.plan_epoch`` named
            it (e.g. SafeCLIP's "risky" and "safe"); "" in the default single pass.
        rows: in ``Defense.loss``, int64 [B] the training rows of the batch's embeddings (the
            global batch under DDP, in the order of the gathered embeddings); None elsewhere.
    """

    epoch: int
    step: int
    encode_captions: Optional[Callable[..., torch.Tensor]] = None
    group: str = ""  # the pass of the epoch a task's step belongs to (``TrainingPass.group``); "" for the default pass
    rows: Optional[torch.Tensor] = None


@dataclass
class DiagnosticRows:
    """What the engine tells a defense about the training rows, for diagnostics only
    (``DefenseBase.observe``): a defense must never act on it.

    Attributes:
        labels: int64 [N], each training row's class (-1 when unknown; a poisoned pair has its
            source image's class).
        is_poison: bool [N], the poisoned pairs.
        names_target: bool [N], whose caption names the attack's target label (whole word, any of
            its class words); None when the attack has no single target label.
    """

    labels: torch.Tensor
    is_poison: torch.Tensor
    names_target: Optional[torch.Tensor] = None


class DefenseBase:
    """What every kind of defense has: its resolved ``Params`` and seed, ``check``, ``metrics``
    and the checkpointed state. A plugin subclasses one of the kinds below, not this."""

    Params: type
    name: str
    kind: str = ""
    # metrics() keys the leaderboard shows for this defense: key -> column label. A list-valued
    # metric (one value per epoch) shows its last value; the mean over seeds; a label ending in
    # "(%)" shows a fraction in percent, any other a number.
    leaderboard_metrics: dict[str, str] = {}

    def __init__(self, params, seed: int):
        self.params = params
        self.seed = seed

    def check(self, train_size: int) -> None:
        """Raise ValueError naming the problem if the defense cannot run on ``train_size``
        training pairs, or a resource it needs (e.g. WordNet) is missing; called before training."""

    def check_run(self, cfg) -> None:
        """Raise ValueError naming the problem if the defense cannot run the settings of cell
        ``cfg`` (a ``config.RunConfig``: epochs, batch size, profile), e.g. a schedule of phases
        longer than the run; called before training, after ``check``. Default: nothing."""

    def observe(self, rows: DiagnosticRows) -> None:
        """Called once before training with facts about the training rows that the defense may
        record diagnostics of (e.g. RoCLIP's share of images matched to a caption of their own
        class), never act on. Default: nothing."""

    def metrics(self) -> dict[str, float | int | list]:
        """The defense's own numbers for the cell's row, called once after training and
        evaluation: key -> a finite number or a list of numbers, stored as column ``d_<key>``
        (keys: letters, digits and ``_``). Names follow the row's conventions: ``n_*`` counts,
        ``*_s`` seconds, anything else a fraction in [0, 1] unless documented otherwise.
        Default: none."""
        return {}

    def state_dict(self) -> dict:
        """Tensors and numbers to checkpoint (loadable with ``torch.load(weights_only=True)``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


class Defense(DefenseBase):
    """The training-time kind (``kind = "training"``): hooks into the one training loop; plain
    CLIP unless a hook is overridden.

    Hooks: ``text_transform`` (captions, once before training), ``train_transform`` (image
    augmentation per sample), ``start_epoch``, ``loss``; ``state_dict``/``load_state_dict`` carry
    any state the checkpoint must hold.
    """

    kind = "training"

    def text_transform_key(self) -> Optional[dict]:
        """What ``text_transform``'s output depends on besides the captions, as JSON-ready values,
        when that is all it depends on: its output is then cached on disk for large training sets
        and shared by every cell and rank with the same key (``poisonbench.train_text``). None
        (the default): computed in every run."""
        return None

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


@dataclass
class TaskBatch:
    """One batch as a ``TrainingTask`` receives it (this rank's slice under DDP).

    Attributes:
        rows: int64 [B], the training-set row of each pair (index into the ``CaptionDataset``).
        images: uint8 [B, 3, H, W], values 0..255, at the stored geometry, on the CPU (or as the
            data holds them); the task brings them to ``image_size`` (``poisonbench.preprocess``:
            ``eval_geometry`` or an augmentation, then ``normalize``) and to ``device``.
        tokens: int64 [B, L], the tokenized captions of the rows (after ``text_transform``).
        image_size: S, the model's input side in pixels.
        device: where the model is.
    """

    rows: torch.Tensor
    images: torch.Tensor
    tokens: torch.Tensor
    image_size: int
    device: torch.device


@dataclass
class TrainingPass:
    """One pass of an epoch over a subset of the training rows, as ``TrainingTask.plan_epoch``
    plans it (SafeCLIP: a unimodal pass over the risky pairs, then a CLIP pass over the safe ones).

    Attributes:
        group: the pass's name: the task's ``step`` sees it as ``state.group``, and the pass's
            shuffle is seeded by it.
        rows: int64 [M], training rows (indices into the ``CaptionDataset``), the same on every
            rank. The trainer shuffles them (seeded by seed, epoch and group) and runs
            floor(M / global batch) steps (the last partial batch is dropped, as the official
            loaders do; a pass smaller than one global batch runs no step).
        lr: function (0-indexed batch of the pass, batches in the pass) -> the absolute learning
            rate of that step, for a task with schedules of its own per pass; None: the phase's
            schedule (``lr_lambda``) continues.
    """

    group: str
    rows: torch.Tensor
    lr: Optional[Callable[[int, int], float]] = None


@dataclass
class EpochContext:
    """What ``TrainingTask.plan_epoch`` is given at the start of an epoch.

    Attributes:
        model: the model being trained (not the DistributedDataParallel wrapper), in train mode;
            a task that scores with it under ``torch.no_grad()`` may switch it to eval mode (the
            trainer switches it back).
        data: the training ``CaptionDataset`` (N pairs; its ``is_poison`` flags are for
            diagnostics only: a defense must never act on them).
        epochs: the phase's epochs (>= 1). steps_per_epoch: optimizer steps of one full pass over
            the N rows, floor(N / global batch). step: optimizer steps taken so far in the phase.
        image_size: S, the model's input side in pixels. device: where the model is.
    """

    model: torch.nn.Module
    data: object
    epochs: int
    steps_per_epoch: int
    step: int
    image_size: int
    device: torch.device


class TrainingTask(Defense):
    """The in-training task kind (``kind = "task"``): owns the forward pass of a batch, as an
    open_clip ``TrainingTask`` does, and returns named scalar loss terms, which the trainer sums
    (each must be finite: ``train.NonFiniteLossError`` names the term), logs and reports.

    The trainer calls ``prepare`` once before training, ``lr_lambda`` and ``start_optimizer``
    when it builds the phase's scheduler and AdamW (defaults: the trainer's schedule, a fresh
    AdamW), ``start_epoch`` and then ``plan_epoch`` before each epoch (the latter may embed the
    whole training set and route rows into passes with learning rates of their own, SafeCLIP), and
    ``step`` for every batch inside the trainer's autocast (bf16 on CUDA). ``loss`` and ``train_transform`` are not used. The task uses
    ``poisonbench.preprocess`` itself and, under DDP, ``poisonbench.distributed.gather_with_grad``
    (``model`` is then the DistributedDataParallel wrapper; every rank runs the same task).
    """

    kind = "task"

    def prepare(self, captions: list[str], tokenizer) -> None:
        """Called once before training with the N training captions and the model's tokenizer
        (list[str] -> int64 [N, L]), e.g. to compute text views. Default: nothing."""

    def plan_epoch(self, epoch: int, ctx: EpochContext) -> Optional[list[TrainingPass]]:
        """The passes of ``epoch`` (1-indexed), run in order, or None (the default) for the
        trainer's one pass over every row. Called after ``start_epoch``, with torch's global RNG
        already seeded for the epoch; a task that draws random numbers here (e.g. augmented views
        to score) should draw them from a generator or ``torch.random.fork_rng`` of its own, so
        that every rank plans the same passes. Under DDP every rank calls it and must return the
        same rows (``poisonbench.distributed`` has the collectives). Whatever the plan depends on
        besides the model and the epoch belongs in ``state_dict``, so that a resumed run plans
        the same passes."""
        return None

    def step(self, model: torch.nn.Module, batch: TaskBatch, state: TrainState) -> dict[str, torch.Tensor]:
        """Named scalar loss terms (float tensors with gradient) of ``batch``; the trainer
        minimises their sum. ``model(images, tokens)`` returns (image_emb [B, D], text_emb [B, D],
        logit_scale) with L2-normalised embeddings (open_clip's CLIP forward)."""
        raise NotImplementedError(f"{type(self).__name__}: a TrainingTask must implement step()")

    def lr_lambda(self, warmup_steps: int, steps_per_epoch: int, epochs: int) -> Optional[Callable[[int], float]]:
        """The phase's learning-rate schedule: a function of the 0-indexed optimizer step of the
        phase -> multiplier of the phase's peak lr (``torch.optim.lr_scheduler.LambdaLR``), given
        its warm-up steps (>= 0), optimizer steps per epoch (>= 1) and epochs (>= 1); e.g. a
        defense's own schedule as its official code runs it. Default None: the trainer's linear
        warm-up then cosine decay (``train.lr_lambda``)."""
        return None

    def start_optimizer(self, optimizer: torch.optim.Optimizer, cached_state: Optional[dict]) -> None:
        """Called once on the phase's fresh AdamW (built over ``train.param_groups`` of the model,
        with the phase's lr and weight decay) before its first step, never when the phase resumes
        from its own checkpoint. ``cached_state``: the ``state_dict()`` of the AdamW that trained
        the model this phase starts from, when the caller has one (a repair starting from the
        cached undefended model: its end-of-training state), else None. Default: nothing (a
        fresh AdamW)."""


@dataclass(frozen=True)
class PhaseSettings:
    """The training settings of one phase of the training loop (``train.train(phase=...)``).

    Attributes:
        name: the phase's name: its checkpoint records it and its shuffling and augmentation
            seeds are drawn from their own stream (e.g. ``"finetune"``).
        epochs: >= 1. batch_size: pairs per step per process, >= 1.
        lr: peak AdamW learning rate (> 0); warmup_steps: linear warm-up steps (>= 0) before the
            cosine decay to 0 at the last step. weight_decay: AdamW decoupled weight decay (>= 0;
            not on norms, biases, logit scale).
    """

    name: str
    epochs: int
    lr: float
    batch_size: int
    warmup_steps: int
    weight_decay: float

    def __post_init__(self):
        if not self.name:
            raise ValueError("a training phase needs a name (its checkpoint and seeds are keyed by it)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"phase {self.name}: epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"phase {self.name}: lr must be a positive finite number, got {self.lr}")
        if self.warmup_steps < 0 or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"phase {self.name}: warmup_steps and weight_decay must be >= 0, "
                             f"got {self.warmup_steps}, {self.weight_decay}")


class DataFilter(DefenseBase):
    """The data-filter kind (``kind = "filter"``; trojanzoo's training filtering): before
    training, ``score`` every training pair with the cached undefended model (the ``clip`` cell's
    model on the same poisoned data), ``keep`` the unsuspicious ones; the cell then trains the
    undefended CLIP (plain CLIP hooks, from a fresh seeded model) on the kept pairs. The runner
    stores detection metrics of the scores against ``data.is_poison`` (``det_*`` columns) and
    the counts ``n_kept`` / ``n_filtered``.

    The default ``keep`` (spec-badclip-density-detection.md B.6, B.11.14) keeps exactly
    floor(N * (1 - remove_fraction)) pairs, those of the lowest scores; it reads
    ``params.remove_fraction`` (in [0, 1)).
    """

    kind = "filter"

    def score(self, model: torch.nn.Module, tokenizer, data, device: torch.device) -> torch.Tensor:
        """Suspicion of each pair of ``data`` (a ``CaptionDataset`` of N pairs, poisons
        included): float [N] on the CPU, finite, higher = more suspicious. ``model`` is the
        trained undefended CLIP in eval mode on ``device`` (not trained further: score under
        ``torch.no_grad()`` unless the detector needs gradients); ``tokenizer`` (open_clip's, of
        that model) turns captions into int64 tokens [N, L]."""
        raise NotImplementedError(f"{type(self).__name__}: a DataFilter must implement score()")

    def keep(self, scores: torch.Tensor) -> torch.Tensor:
        """bool [N]: True for the pairs to train on, given ``scores`` float [N]. Default: the
        floor(N * (1 - remove_fraction)) lowest scores (ties: the earlier row first)."""
        fraction = getattr(self.params, "remove_fraction", None)
        if fraction is None or not 0.0 <= fraction < 1.0:
            raise ValueError(f"{self.name}: the default keep() needs a parameter remove_fraction in [0, 1), "
                             f"got {fraction!r}; add it to Params or override keep()")
        n = scores.shape[0]
        n_keep = math.floor(n * (1.0 - fraction))
        order = torch.sort(scores, stable=True).indices
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[:n_keep]] = True
        return mask


class PostTrainingRepair(DefenseBase):
    """The post-training repair kind (``kind = "repair"``): the runner loads the cached
    undefended model (trained on the poisoned data), fine-tunes it on the dataset's clean
    fine-tuning split (``DatasetBundle.finetune``) through the same training loop, with the
    settings of ``phase`` and the hooks of the defense ``training()`` returns (own checkpoint,
    resumable), then evaluates it. A dataset without a fine-tuning split refuses the cell before
    any training."""

    kind = "repair"

    def phase(self, cfg) -> PhaseSettings:
        """The fine-tuning phase's settings for the cell ``cfg`` (a ``config.RunConfig``; its
        ``profile`` says the scale), usually from this defense's Params."""
        raise NotImplementedError(f"{type(self).__name__}: a PostTrainingRepair must implement phase()")

    def training(self) -> Defense:
        """The training-time or task defense the trainer runs in the fine-tuning phase (the same
        object every call: its state is checkpointed)."""
        raise NotImplementedError(f"{type(self).__name__}: a PostTrainingRepair must implement training()")

    def observe(self, rows: DiagnosticRows) -> None:
        """Called once before training with facts about the training rows that the defense may
        record diagnostics of (e.g. RoCLIP's share of images matched to a caption of their own
        class), never act on. Default: nothing."""

    def metrics(self) -> dict[str, float | int | list]:
        """Default: the numbers of the defense that trained the fine-tuning phase."""
        return self.training().metrics()

    def state_dict(self) -> dict:
        return self.training().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.training().load_state_dict(state)
