"""One training loop for every defense: AdamW, warm-up + cosine schedule, logit scale clamped at
100, AMP (bf16) on CUDA, seeded and deterministic on CPU, a checkpoint at the end of each epoch,
one process or several under torchrun (DistributedDataParallel, see ``distributed``)."""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import distributed
from .config import RunConfig
from .datasets.base import CaptionDataset, is_lazy
from .defenses.base import Defense, EpochContext, PhaseSettings, TaskBatch, TrainingPass, TrainingTask, TrainState
from .evaluate import encode_tokens
from .preprocess import eval_geometry, normalize
from .speed import SpeedOptions, from_env as speed_from_env
from .train_text import CaptionTokens, transformed_captions
from .models import image_size
from .utils import atomic_write, decode_workers, derive_seed, usable_cores

MAX_LOGIT_SCALE = math.log(100.0)


class NonFiniteLossError(RuntimeError):
    """The training loss, or one named loss term of a ``TrainingTask`` (``term``), became NaN or
    infinite."""

    def __init__(self, step: int, epoch: int, value: float, term: str | None = None):
        what = "loss" if term is None else f"loss term {term!r} ="
        super().__init__(f"non-finite {what} {value} at step {step} (epoch {epoch}); lower the learning rate")
        self.step, self.epoch, self.value, self.term = step, epoch, value, term


@dataclass
class TrainResult:
    """What ``train`` did. Times are wall-clock seconds of this call (epochs resumed from a
    checkpoint are not counted): ``train_s`` the whole loop, ``data_wait_s`` the part spent waiting
    for a batch of images (``prefetched``), ``augment_s`` the part in the image augmentation (on
    CUDA, only its launch: kernels run asynchronously)."""

    steps: int
    final_loss: float
    train_s: float
    resumed_from_epoch: int
    data_wait_s: float = 0.0
    augment_s: float = 0.0
    loss_terms: dict[str, float] = field(default_factory=dict)  # a TrainingTask's terms at the last step
    optimizer_state: dict | None = None  # the AdamW's final state_dict(), when train() was asked to keep it
    history: list[dict] = field(default_factory=list)  # epoch_metrics' record of each epoch, resumed ones included


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups, ``[no-decay group (weight_decay 0), decay group (weight_decay)]``.

    A trainable parameter gets no weight decay when it has fewer than 2 dimensions or its name
    contains "bn", "ln", "bias" or "logit_scale"; every other trainable parameter gets
    ``weight_decay``. This is open_clip's rule (the ``exclude`` of its training script,
    src/training/main.py), not exactly RoCLIP's: RoCLIP's code (docs/roclip-spec.md §1.10; its
    model/src/main.py) groups by the name alone, so it also decays the 1-D parameters whose names
    lack those words, which this rule does not: ``visual.class_embedding`` in every ViT (the tiny
    and cpu-small models included) and, in RN50, the BatchNorm weights of the first block's
    downsample in each stage (``visual.layer{1..4}.0.downsample.1.weight``). Every other parameter
    of poisonbench-tiny, poisonbench-cpu-small, RN50 and ViT-B-32 is grouped as in RoCLIP. Kept as
    it is: changing it changes the numbers of every existing cell.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_lambda(warmup: int, total: int):
    """Multiplier of the peak LR at 0-indexed ``step``: linear warm-up over ``warmup`` steps,
    then cosine decay to 0 at ``total`` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def train(
    model: torch.nn.Module,
    tokenizer,
    data: CaptionDataset,
    defense: Defense,
    cfg: RunConfig,
    device: torch.device,
    checkpoint: Path | None = None,
    progress: bool = True,
    on_epoch_end=None,
    phase: PhaseSettings | None = None,
    optimizer_state: dict | None = None,
    keep_optimizer_state: bool = False,
    epoch_metrics=None,
    view_probe=None,
    speed: SpeedOptions | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` with ``defense``'s hooks.

    ``defense`` is a training-time ``Defense`` (its ``loss`` of the embeddings) or a
    ``TrainingTask`` (its ``step`` runs the forward pass and returns named loss terms, which are
    summed; ``TrainResult.loss_terms`` holds their last values). ``phase`` gives the settings of
    a training phase other than the cell's own (a repair's fine-tuning: epochs, lr, batch size,
    warm-up, weight decay; default: those of ``cfg``); its shuffling and augmentation seeds come
    from a stream of its own, and its checkpoint records its name.

    A ``TrainingTask`` may set the schedule (its ``lr_lambda``; default the trainer's) and start
    the fresh AdamW its own way (its ``start_optimizer``, called once before the first step unless
    the phase resumes from its checkpoint, with ``optimizer_state``: the ``state_dict()`` of the
    AdamW that trained the starting model, e.g. the cached undefended model's, or None).
    ``keep_optimizer_state``: return the AdamW's final ``state_dict()`` in
    ``TrainResult.optimizer_state`` (the cache of the undefended model stores it).

    Each epoch shuffles with a generator seeded from (seed, epoch) and reseeds torch's global RNG
    (used by the augmentations), so resuming from an end-of-epoch checkpoint repeats exactly the
    uninterrupted run. A checkpoint whose config hash, phase (and number of processes) match is
    resumed. ``on_epoch_end(epoch, model)``, if given, is called after each epoch's checkpoint.

    ``epoch_metrics(epoch, model)``, if given, is called on rank 0 at the end of each epoch, before
    its checkpoint, with the model in eval mode; it returns a dict of numbers (e.g. the per-epoch
    clean accuracy and ASR) that is stored with ``{"epoch": epoch}`` in ``TrainResult.history``
    and in the checkpoint, so a resumed run reports every epoch's record. It must not draw from
    torch's global RNG. ``view_probe(rows, inputs, views, transform)``, if given, is called after
    every step's image augmentation of a training-time defense (not a task), with the batch's rows
    (int64 [B]), its uint8 images (stored geometry), the views the model gets and the defense's
    transform (None without augmentation; a kornia container holds its parameters of the step),
    e.g. ``survival.TriggerSurvival``; it must change nothing. A probe with a ``sync()`` method
    has it called on every rank at the end of each epoch, before ``epoch_metrics``. ``speed``:
    the ``speed.SpeedOptions`` to train with (default: those of ``bench run --speed``, all off).

    In a process group of W ranks (``distributed.init``) every rank calls this with the same
    arguments: ``cfg.batch_size`` is per rank, so a step sees a global batch of batch_size x W
    pairs, of which rank r takes the r-th contiguous slice of the common epoch permutation, with
    its own augmentation seed. The model is wrapped in DistributedDataParallel and the defense's
    loss receives the embeddings gathered from all ranks with gradients
    (``distributed.gather_with_grad``), so its pool, if any, is the same on every rank. Only rank
    0 writes the checkpoint and shows the progress bar; every rank loads the same checkpoint.

    Raises:
        ValueError: fewer training pairs than one global batch; a task that returned no loss term.
        NonFiniteLossError: the loss (or a task's loss term, named) became NaN or inf.
    """
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    settings = phase or PhaseSettings(MAIN_PHASE, cfg.epochs, cfg.lr, cfg.batch_size, cfg.warmup_steps, cfg.weight_decay)
    # the cell's own phase keeps the seeds it always had; another phase draws from its own stream
    tag = () if phase is None else (phase.name,)
    n, bs = len(data), settings.batch_size
    global_bs = bs * world
    if n < global_bs:
        per = f" ({bs} per process x {world} processes)" if world > 1 else ""
        raise ValueError(f"{n} training pairs are fewer than one batch of {global_bs}{per}; lower batch_size")
    steps_per_epoch = n // global_bs  # drop_last, as the official code
    total = steps_per_epoch * settings.epochs
    size = image_size(model)
    task = isinstance(defense, TrainingTask)
    if task:
        defense.prepare(list(data.captions), tokenizer)
    # data in memory: every caption tokenized now, as always; lazily loaded data: batch by batch, in
    # the decoding workers, so that host memory does not grow with the dataset
    tokens = CaptionTokens(transformed_captions(defense, data.captions), tokenizer, eager=not is_lazy(data.images))
    transform = None if task else defense.train_transform(size)

    speed = speed or speed_from_env()
    speed.layout(model.to(device)).train()
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    net = speed.wrap(net)
    input_format = speed.input_format(model)
    optimizer = speed.optimizer(param_groups(model, settings.weight_decay), settings.lr)
    schedule = defense.lr_lambda(settings.warmup_steps, steps_per_epoch, settings.epochs) if task else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or lr_lambda(settings.warmup_steps, total))
    amp = device.type == "cuda"

    start_epoch, step, loss_value, loss_terms, history = 1, 0, float("nan"), {}, []
    distributed.barrier()  # rank 0 may have removed a stale checkpoint: all ranks see the same file
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None:
        if state.get("world_size", 1) != world:
            warnings.warn(f"the checkpoint {checkpoint} was written by {state.get('world_size', 1)} process(es), "
                          f"this run has {world}; training from scratch")
        elif state.get("config_hash") == cfg.config_hash and state.get("phase", MAIN_PHASE) == settings.name:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            defense.load_state_dict(state["defense"])
            start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
            loss_value = float(state.get("loss", float("nan")))  # a run resumed after its last epoch reports it
            loss_terms = {k: float(v) for k, v in state.get("loss_terms", {}).items()}
            history = list(state.get("history", []))
            if epoch_metrics is not None and "history" not in state and main:
                warnings.warn(f"the checkpoint {checkpoint} was written by an older poisonbench, without per-epoch "
                              f"records: the cell's curves and trigger survival start at epoch {start_epoch}")
    if task and start_epoch == 1:  # a fresh optimizer: the task may start it its own way
        defense.start_optimizer(optimizer, optimizer_state)

    def encode_captions(k: int, with_rows: bool = False):
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "pool", step))
        rows = torch.randint(0, n, (k,), generator=g)
        emb = encode_tokens(model, tokens[rows], batch_size=1024, device=device)
        emb = distributed.broadcast_(emb)  # every rank's pool must be the same, to the last bit
        return (emb, rows) if with_rows else emb

    fetch = {"wait_s": 0.0}
    augment_s, rate = 0.0, 0.0
    t0 = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[rate]:.0f} samples/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not (progress and main),
        transient=False,
    )
    with bar:
        if start_epoch > 1 and main:
            bar.console.print(f"resuming from the checkpoint of epoch {start_epoch - 1} ({checkpoint})")
        title = f"{cfg.defense} / {cfg.attack}" + (f" ({settings.name})" if phase is not None else "")
        bar_task = bar.add_task(title, total=total, completed=step, loss=float("nan"), rate=0.0)
        for epoch in range(start_epoch, settings.epochs + 1):
            torch.manual_seed(augment_seed(cfg.seed, epoch, rank, world, tag))
            shuffle = torch.Generator().manual_seed(derive_seed(cfg.seed, *tag, "shuffle", epoch))
            passes = [(None, torch.randperm(n, generator=shuffle), None)]  # the default: one pass over every row
            defense.start_epoch(TrainState(epoch, step, encode_captions))
            if task:
                plan = defense.plan_epoch(epoch, EpochContext(model, data, settings.epochs, steps_per_epoch, step, size, device))
                model.train()
                if plan is not None:
                    passes = [(p.group, shuffled(p, cfg.seed, tag, epoch), p.lr) for p in plan]
                    planned = sum(len(rows) // global_bs for _, rows, _ in passes)
                    bar.update(bar_task, total=step + planned + steps_per_epoch * (settings.epochs - epoch))
            bar.update(bar_task, description=f"{title}  epoch {epoch}/{settings.epochs}")
            t_epoch, done = time.perf_counter(), 0
            for group, order, pass_lr in passes:
                n_steps = len(order) // global_bs
                batches = prefetched(data.images, batch_rows(order, n_steps, bs, rank, world), fetch,
                                     background=device.type == "cuda" or is_lazy(data.images),
                                     workers=decode_workers(device.type == "cuda") if is_lazy(data.images) else 0,
                                     pin=device.type == "cuda", tokens=tokens)
                for b, (idx, images, batch_tokens) in enumerate(batches):
                    if task:  # the task runs the forward pass and returns named loss terms
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                            terms = defense.step(net, TaskBatch(idx, images, batch_tokens, size, device),
                                                 TrainState(epoch, step, group=group or ""))
                        loss = task_loss(terms, step, epoch, defense.name)
                        loss_terms.update({k: v.item() for k, v in terms.items()})
                    else:
                        raw = images
                        if transform is not None:
                            t_aug = time.perf_counter()
                            images = transform(raw.to(device, non_blocking=True).float() / 255.0)
                            augment_s += time.perf_counter() - t_aug
                        else:
                            images = eval_geometry(raw, size).to(device)
                        if view_probe is not None:
                            view_probe(idx, raw, images, transform)
                        x = normalize(images).contiguous(memory_format=input_format)
                        t = batch_tokens.to(device, non_blocking=True)
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                            img_emb, txt_emb, scale = net(x, t)
                            img_emb, txt_emb = distributed.gather_with_grad(img_emb.float(), txt_emb.float())
                            rows = order[b * global_bs : (b + 1) * global_bs]  # the global batch, every rank's slice
                            loss = defense.loss(img_emb, txt_emb, scale.float(), TrainState(epoch, step, rows=rows))
                        if not torch.isfinite(loss):
                            raise NonFiniteLossError(step, epoch, loss.item())
                    if pass_lr is not None:  # the pass's own schedule sets this step's learning rate
                        for g in optimizer.param_groups:
                            g["lr"] = pass_lr(b, n_steps)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    with torch.no_grad():
                        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                    step += 1
                    done += 1
                    loss_value = loss.item()
                    rate = done * global_bs / (time.perf_counter() - t_epoch)
                    bar.update(bar_task, advance=1, loss=loss_value, rate=rate)
            if progress and main:  # one line per epoch: a log that survives when the bar is not a live terminal
                parts = "".join(f", {k} {v:.3f}" for k, v in loss_terms.items())
                bar.console.print(f"{'' if phase is None else settings.name + ' '}epoch {epoch}/{settings.epochs}: "
                                  f"loss {loss_value:.3f}{parts}, {rate:.0f} samples/s, {time.perf_counter() - t_epoch:.0f} s")
            if hasattr(view_probe, "sync"):  # every rank's views of the epoch, summed on rank 0
                view_probe.sync()
            if epoch_metrics is not None and main:
                model.eval()
                history.append({"epoch": epoch, **epoch_metrics(epoch, model)})
                model.train()
            if checkpoint is not None and main:
                save_checkpoint(checkpoint, cfg, epoch, step, model, optimizer, scheduler, defense, world, loss_value,
                                settings.name, loss_terms, history)
            distributed.barrier()  # no rank runs ahead of the last checkpoint
            if on_epoch_end is not None:
                on_epoch_end(epoch, model)
    return TrainResult(step, loss_value, time.perf_counter() - t0, start_epoch - 1, fetch["wait_s"], augment_s,
                       loss_terms, optimizer.state_dict() if keep_optimizer_state else None, history)


MAIN_PHASE = "train"  # the name of a cell's own training phase (RunConfig's settings) in checkpoints


def task_loss(terms: dict[str, torch.Tensor], step: int, epoch: int, who: str = "task") -> torch.Tensor:
    """The sum of a ``TrainingTask``'s named scalar loss terms (in their order).

    Raises ValueError when there is no term or a term is not a scalar tensor; NonFiniteLossError
    naming the first term that is NaN or infinite."""
    if not terms:
        raise ValueError(f"{who}: step() returned no loss term; return a dict of named scalar losses")
    total = None
    for name, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"{who}: loss term {name!r} must be a scalar tensor, got {type(value).__name__}"
                             + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""))
        if not torch.isfinite(value):
            raise NonFiniteLossError(step, epoch, value.item(), name)
        total = value if total is None else total + value
    return total.reshape(())


def shuffled(p: TrainingPass, seed: int, tag: tuple, epoch: int) -> torch.Tensor:
    """The rows of a planned pass in the order the trainer runs them: a permutation seeded by
    (seed, phase, epoch, the pass's group), the same on every rank."""
    rows = torch.as_tensor(p.rows, dtype=torch.int64)
    g = torch.Generator().manual_seed(derive_seed(seed, *tag, "shuffle", epoch, p.group))
    return rows[torch.randperm(len(rows), generator=g)]


def batch_rows(order: torch.Tensor, steps: int, batch_size: int, rank: int = 0, world: int = 1):
    """Row indices (int64 [batch_size]) of this rank's slice of each of ``steps`` global batches of
    the epoch permutation ``order`` (global batch = batch_size x world; rank r takes the r-th slice)."""
    for b in range(steps):
        start = (b * world + rank) * batch_size
        yield order[start : start + batch_size]


def prefetched(images, batches, stats: dict | None = None, background: bool = True, workers: int = 0,
               pin: bool = False, tokens=None):
    """(rows, uint8 images[rows], tokens[rows] or None) for each ``rows`` of ``batches``, in their order.

    With ``workers`` > 0, ``workers`` processes of torch's DataLoader fetch the batches (for
    lazily decoded images, ``datasets.lazy``: each worker reads and decodes whole batches, and
    tokenizes their captions), up to two batches ahead per worker; ``pin`` puts them in pinned
    memory for an asynchronous copy to a GPU. The rows and their order are those of ``batches``
    whatever the number of workers, so the numbers do not change (a test). With ``background``
    (and no workers), the next batch is fetched in a background thread while the caller trains
    on the current one: a GPU never waits for a host-side copy. Without either, each batch is
    fetched when asked for: on a CPU-only run with the images in memory the fetch is a fast
    copy, and a second thread running tensor ops would start its own OpenMP team that competes
    with the training step's (measured: 17 % fewer samples/s on 2 cores). ``tokens``: anything
    indexable by rows (``train_text.CaptionTokens``), or None. ``stats["wait_s"]``, if given,
    accumulates the seconds the caller waited for a batch.
    """
    def waited_for(get):
        t_wait = time.perf_counter()
        out = get()
        if stats is not None:
            stats["wait_s"] += time.perf_counter() - t_wait
        return out

    fetch = BatchFetch(images, tokens)
    if workers > 0:
        # its own generator: the workers' base seed must not be drawn from torch's global RNG, which
        # the augmentations draw from
        loader = torch.utils.data.DataLoader(fetch, batch_size=None, sampler=list(batches), num_workers=workers,
                                             pin_memory=pin, prefetch_factor=2, worker_init_fn=_one_thread,
                                             generator=torch.Generator().manual_seed(0))
        it = iter(loader)
        while (item := waited_for(lambda: next_from_worker(it))) is not None:
            yield item
        return
    batches = iter(batches)
    if not background:
        for rows in batches:
            yield waited_for(lambda: fetch[rows])
        return
    with ThreadPoolExecutor(1) as loader:
        rows = next(batches, None)
        pending = loader.submit(fetch.__getitem__, rows) if rows is not None else None
        while pending is not None:
            fetched = waited_for(pending.result)
            rows = next(batches, None)
            pending = loader.submit(fetch.__getitem__, rows) if rows is not None else None
            yield fetched


def next_from_worker(it):
    """The next item of a DataLoader iterator, or None at its end. An error in a worker is raised
    again as the worker's own error (e.g. RuntimeError naming an image that cannot be read any
    more), without the DataLoader's wrapping of the worker's whole traceback."""
    try:
        return next(it, None)
    except Exception as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        kind, _, message = last.partition(": ")
        raise type(e)(message if kind == type(e).__name__ else last) from None


class BatchFetch(torch.utils.data.Dataset):
    """A DataLoader's map-style dataset whose index is a whole batch: ``[rows]`` gives
    (rows, images[rows], tokens[rows] or None) for int64 ``rows`` [B] (images uint8 [B, 3, S, S])."""

    def __init__(self, images, tokens=None):
        self.images, self.tokens = images, tokens

    def __getitem__(self, rows: torch.Tensor):
        return rows, self.images[rows], None if self.tokens is None else self.tokens[rows]


def _one_thread(_worker: int) -> None:
    """In a decoding worker: decode one image at a time (the workers are the parallelism; torch's
    DataLoader already gives each of them one intra-op thread)."""
    images = torch.utils.data.get_worker_info().dataset.images
    if hasattr(images, "workers"):
        images.workers = 1


def augment_seed(seed: int, epoch: int, rank: int = 0, world: int = 1, tag: tuple = ()) -> int:
    """Seed of torch's global RNG (the augmentations) for ``epoch`` on ``rank`` of ``world``
    processes: distinct per rank, so that ranks do not draw the same augmentations; in one
    process the seed of (seed, epoch) alone, as before DDP. ``tag``: the phase's name, for a
    phase other than the cell's own (a stream of its own), else empty."""
    return derive_seed(seed, *tag, "augment", epoch) if world == 1 else derive_seed(seed, *tag, "augment", epoch, rank)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded safely (changed, truncated or not poisonbench's)."""


CHECKPOINT_KEYS = frozenset({"config_hash", "epoch", "step", "model", "optimizer", "scheduler", "defense"})


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path``, or None when there is none.

    Loaded with ``torch.load(weights_only=True)``: plain tensors and numbers, never code, so a
    pickle that would run code is rejected before anything in it runs. Checkpoints are written
    atomically, so an unreadable one was changed by something else: it is refused, not silently
    replaced by training from scratch.

    Raises:
        CheckpointError: the file is not a loadable poisonbench checkpoint; the message says how
            to start the cell over.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # tampered, truncated, code in the pickle, or not a checkpoint at all
        raise CheckpointError(
            f"refusing checkpoint {path}: it cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "poisonbench writes checkpoints atomically, so something else changed it; delete it, or rerun with "
            "--force, to train this cell from scratch") from None
    missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else sorted(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"refusing checkpoint {path}: not a complete poisonbench checkpoint (no "
                              f"{', '.join(missing)}); delete it, or rerun with --force, to train this cell from scratch")
    return state


def save_checkpoint(path: Path, cfg: RunConfig, epoch: int, step: int, model, optimizer, scheduler, defense,
                    world_size: int = 1, loss: float = float("nan"), phase: str = MAIN_PHASE,
                    loss_terms: dict[str, float] | None = None, history: list[dict] | None = None) -> None:
    """Write the end-of-epoch state atomically (loadable with ``torch.load(weights_only=True)``).
    ``world_size``, the number of processes that trained it, is stored: a run with another
    number of processes (another global batch) does not resume it. ``loss`` is the last step's
    loss, ``loss_terms`` a task's named terms at that step; ``phase`` the training phase's name
    (a checkpoint of another phase is not resumed); ``history`` the per-epoch records so far
    (``train``'s ``epoch_metrics``)."""
    state = {
        "config_hash": cfg.config_hash,
        "world_size": world_size,
        "epoch": epoch,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "defense": defense.state_dict(),
        "loss": loss,
        "phase": phase,
        "loss_terms": dict(loss_terms or {}),
        "history": list(history or []),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def set_threads() -> None:
    """Use every core the process may run on for intra-op parallelism on CPU, unless
    ``OMP_NUM_THREADS`` says otherwise."""
    if os.environ.get("OMP_NUM_THREADS"):
        return  # torch already follows it
    torch.set_num_threads(usable_cores())
