"""``bench perf``: how fast the harness is, measured (not asserted) on this machine.

Four measurements, each repeated with the variants interleaved and rotated (``interleaved``) so
that noise from the rest of the machine hits all of them alike; medians are reported:

- training throughput (samples/s) through the real trainer (``train.train``) for each defense, on
  the profile's model, batch and optimizer, against a minimal hand-written open_clip loop
  (forward, ``open_clip.ClipLoss``, backward, AdamW step) on the same pairs as pre-made tensors;
  each trainer run spans ``epochs`` short epochs so RoCLIP's matching epochs come in the share
  its schedule gives them (cpu-small: match_every=3, epochs 3 of 3);
- where the trainer's wall time goes: waiting for a batch, augmenting it, the rest (the step);
- poisoning: the seconds to apply each backdoor's trigger to every training image of the
  dataset (60k for Fashion-MNIST) and to build each attack's poisoned training set from them;
- evaluation: zero-shot over the evaluation set, the attack's ASR, the linear probe, retrieval;
- peak resident memory of the process after each stage.
"""
from __future__ import annotations

import copy
import functools
import dataclasses
import platform
import resource
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .config import PROFILES, RunConfig, get_profile, resolve
from .preprocess import normalize
from .registry import ATTACKS, DATASETS, DEFENSES, build_params
from .utils import atomic_write, usable_cores

DEFENSE_NAMES = ("clip", "roclip", "aug-only")


@dataclasses.dataclass
class PerfOptions:
    """What ``run_perf`` measures.

    Attributes:
        profile: the profile whose model, data, batch size, optimizer and defense settings are used.
        steps: optimizer steps per epoch of each training measurement (>= 1).
        epochs: epochs per training measurement (>= 1); 3 covers one RoCLIP matching epoch of cpu-small.
        repeats: repetitions of every measurement (>= 1); the median is reported.
        poison_images: training images the triggers are applied to, and the poisoned training set
            is built from; 0 = the dataset's whole training split.
        stages: which of training, poisoning, eval to run.
        threads: PyTorch CPU threads; 0 = every usable core (as ``bench run``), unless
            OMP_NUM_THREADS is set.
    """

    profile: str = "cpu-small"
    steps: int = 16
    epochs: int = 3
    repeats: int = 9
    poison_images: int = 0
    stages: tuple[str, ...] = ("training", "poisoning", "eval")
    threads: int = 0


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if platform.system() == "Darwin" else 2**10)


def interleaved(variants: dict[str, Callable[[], dict[str, float]]], repeats: int, on_done=None) -> list[dict]:
    """Run each variant ``repeats`` times, repetition by repetition, starting repetition r at the
    r-th variant (rotated), so that neither drift nor whatever ran just before favours one
    variant. Each call returns {measure: value}; the result has one record per (variant,
    repeat, measure), in the order run."""
    names, records = list(variants), []
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for measure, value in variants[name]().items():
                records.append({"variant": name, "repeat": r, "measure": measure, "value": float(value)})
            if on_done is not None:
                on_done(name)
    return records


def bare_loop(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, cfg: RunConfig, steps: int) -> float:
    """Samples/s of a minimal open_clip training loop: ``steps`` steps over the pre-made float
    images [N, 3, S, S] (normalised) and int64 tokens [N, L] in order, wrapping around, with
    ``open_clip.ClipLoss`` and AdamW at the config's lr and weight decay. Trains ``model`` in place."""
    import open_clip

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = open_clip.ClipLoss()
    bs, n = cfg.batch_size, len(images) // cfg.batch_size
    t0 = time.perf_counter()
    for step in range(steps):
        b = step % n
        image_emb, text_emb, scale = model(images[b * bs : (b + 1) * bs], tokens[b * bs : (b + 1) * bs])
        loss = loss_fn(image_emb, text_emb, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * bs / (time.perf_counter() - t0)


@functools.lru_cache(maxsize=1)
def load_data(profile: str, n_train: int | None = None):
    """The profile's clean data (seed 0), with ``n_train`` training pairs when given (0 = the whole
    split). The last bundle is kept, so ``check`` and the poisoning stage load it once.
    Raises ValueError when the data has fewer than ``n_train`` pairs."""
    extra = {} if n_train is None else {"n_train": n_train}
    base = resolve("none", "clip", profile=profile, dataset_params=extra)
    ds_cls = DATASETS.get(base.dataset)
    return ds_cls(build_params(ds_cls.Params, base.dataset_params, "dataset")).load(0)


def training_measurements(opts: PerfOptions, progress) -> list[dict]:
    """Throughput of the bare loop and of the trainer with each defense, interleaved, after one
    short unrecorded warm-up call of each (one-off costs: allocator, WordNet, kornia)."""
    from .models import create_model
    from .train import train

    base = resolve("none", "clip", profile=opts.profile)
    data = load_data(opts.profile).train
    bs = base.batch_size
    if len(data) < opts.steps * bs:
        raise ValueError(f"--steps {opts.steps}: the {opts.profile} profile has {len(data)} training pairs, "
                         f"fewer than {opts.steps} batches of {bs}")
    pairs = data.subset(torch.arange(opts.steps * bs))
    torch.manual_seed(0)
    model0, tokenizer = create_model(base.model)
    images, tokens = normalize(pairs.images), tokenizer(pairs.captions)  # the bare loop's pre-made tensors

    def trainer(defense: str) -> Callable[[bool], dict[str, float]]:
        cfg = resolve("none", defense, profile=opts.profile)
        cls = DEFENSES.get(defense)

        def go(warm_up: bool) -> dict[str, float]:
            d = cls(build_params(cls.Params, cfg.defense_params, f"defense {defense!r}"), cfg.seed)
            run_cfg, run_pairs = dataclasses.replace(cfg, epochs=opts.epochs), pairs
            if warm_up:  # also shrinks the pool: a warm-up only has to touch every code path once
                run_pairs = pairs.subset(torch.arange(bs))
                d.params = dataclasses.replace(d.params, **({"pool_size": bs, "match_every": 1} if defense == "roclip" else {}))
                run_cfg = dataclasses.replace(cfg, epochs=1)
            d.check(len(run_pairs))  # the pool fits: see ``check``
            r = train(copy.deepcopy(model0), tokenizer, run_pairs, d, run_cfg, torch.device("cpu"), None, progress=False)
            return {"samples_per_s": r.steps * bs / r.train_s, "data_wait_share": r.data_wait_s / r.train_s,
                    "augment_share": r.augment_s / r.train_s}

        return go

    def bare(warm_up: bool) -> dict[str, float]:
        steps = 1 if warm_up else opts.steps * opts.epochs
        return {"samples_per_s": bare_loop(copy.deepcopy(model0), images, tokens, base, steps)}

    variants = {BARE: bare, **{d: trainer(d) for d in DEFENSE_NAMES}}
    task = progress.add_task("training throughput", total=len(variants) * opts.repeats)
    for fn in variants.values():
        fn(True)
    timed = {name: (lambda fn=fn: fn(False)) for name, fn in variants.items()}
    return interleaved(timed, opts.repeats, lambda _: progress.advance(task))


def poisoning_measurements(opts: PerfOptions, progress) -> list[dict]:
    """Seconds to apply each backdoor's trigger to ``poison_images`` training images, and to build
    each attack's poisoned training set (``Attack.poison``) from them, with the profile's attack
    parameters."""
    data = load_data(opts.profile, opts.poison_images)
    names = [a for a in ATTACKS.names() if getattr(ATTACKS.get(a), "poisons", True)]  # not the clean baseline
    variants = {}
    for name in names:
        cfg = resolve(name, "clip", profile=opts.profile, dataset_params={"n_train": opts.poison_images})
        cls = ATTACKS.get(name)
        attack = cls(build_params(cls.Params, cfg.attack_params, f"attack {name!r}"), cfg.seed)

        def go(attack=attack) -> dict[str, float]:
            # poison first: an attack may only know its trigger once it has poisoned (one that needs a
            # model is timed without it: model_init; its optimisation is not part of this stage)
            out = {"n_images": len(data.train)}
            t0 = time.perf_counter()
            attack.poison(data)
            out["poison_s"] = time.perf_counter() - t0
            if hasattr(attack, "apply_trigger"):
                t0 = time.perf_counter()
                attack.apply_trigger(data.train.images, attack.generator(2))
                out["trigger_s"] = time.perf_counter() - t0
            return out

        variants[name] = go
    task = progress.add_task(f"poisoning {len(data.train)} images", total=len(variants) * opts.repeats)
    return interleaved(variants, opts.repeats, lambda _: progress.advance(task))


def eval_measurements(opts: PerfOptions, progress) -> list[dict]:
    """Seconds of each part of a cell's evaluation (``runner.evaluate``) with the profile's
    evaluation data, on a model trained for ``steps`` steps of badnet-poisoned data with CLIP
    (an untrained model would make the linear probe's optimiser stop unrealistically early)."""
    from .models import create_model
    from .runner import evaluate, prepare
    from .train import train

    cfg = dataclasses.replace(resolve("badnet", "clip", profile=opts.profile), epochs=1)
    cell = prepare(cfg, "cpu")
    torch.manual_seed(0)
    model, tokenizer = create_model(cfg.model)
    few = cell.plan.train.subset(torch.arange(min(len(cell.plan.train), opts.steps * cfg.batch_size)))
    train(model, tokenizer, few, cell.defense, cfg, cell.device, None, progress=False)
    task = progress.add_task(f"evaluation ({len(cell.data.eval)} images)", total=opts.repeats)
    keys = ("zero_shot_s", "attack_eval_s", "probe_s", "retrieval_s", "eval_s")
    return interleaved({"evaluate": lambda: {k: v for k, v in evaluate(model, tokenizer, cell, cell.device).items()
                                             if k in keys}}, opts.repeats, lambda _: progress.advance(task))


BARE = "bare loop"  # the hand-written open_clip loop
STAGES = {"training": training_measurements, "poisoning": poisoning_measurements, "eval": eval_measurements}


def machine() -> dict[str, str | int]:
    """Columns describing where the figures were measured."""
    from .runner import git_rev

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": usable_cores(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "git_rev": git_rev()}


def check(opts: PerfOptions) -> None:
    """Raise ValueError, naming the problem and the fix, for options that could not finish, so
    that nothing is measured in vain: an unknown profile or stage, a profile whose data must be
    given (paper), fewer pairs per epoch than RoCLIP's pool, more images to poison than the data has."""
    profile = get_profile(opts.profile)
    unknown = set(opts.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))}; valid: {', '.join(STAGES)}")
    if min(opts.steps, opts.epochs, opts.repeats) < 1 or opts.threads < 0:
        raise ValueError("steps, epochs and repeats must be >= 1, threads >= 0")
    if _takes_data(profile.dataset):
        builtin = ", ".join(p for p in PROFILES if not _takes_data(PROFILES[p].dataset))
        raise ValueError(f"bench perf measures the profiles with built-in data ({builtin}); "
                         f"for the {opts.profile} profile on a GPU, use scripts/paper_throughput.py")
    pool = resolve("none", "roclip", profile=opts.profile).defense_params.get("pool_size", 0)
    if "training" in opts.stages and opts.steps * profile.batch_size < pool:
        raise ValueError(f"--steps {opts.steps} gives {opts.steps * profile.batch_size} pairs per epoch, fewer than "
                         f"RoCLIP's pool of {pool} on {opts.profile}; use --steps {-(-pool // profile.batch_size)} or more")
    if "poisoning" in opts.stages and opts.poison_images:
        load_data(opts.profile, opts.poison_images)  # raises when there are too few; kept for the stage


def _takes_data(dataset: str) -> bool:
    """True for a dataset that reads the user's ``--data`` (``cli_options``): nothing to measure without it."""
    return "data" in getattr(DATASETS.get(dataset), "cli_options", {})


def run_perf(opts: PerfOptions, progress) -> pd.DataFrame:
    """Run the selected stages; one row per (stage, variant, repeat, measure) with ``value`` and
    the peak RSS after the stage, in MiB (``peak_rss_mib``), plus the machine's columns.

    Raises ValueError for a profile, stage or step count that cannot run."""
    from .train import set_threads

    check(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    else:
        set_threads()
    rows = []
    for stage in STAGES:
        if stage not in opts.stages:
            continue
        records = STAGES[stage](opts, progress)
        rows += [{"stage": stage, **r} for r in records]
        rows.append({"stage": stage, "variant": "process", "repeat": 0, "measure": "peak_rss_mib", "value": peak_rss_mib()})
    frame = pd.DataFrame(rows)
    for k, v in {**machine(), "profile": opts.profile, "steps": opts.steps, "epochs": opts.epochs,
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}.items():
        frame[k] = v
    return frame


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Medians (``value``) and ranges (``lo``, ``hi``) over repeats, one row per (stage, variant,
    measure), with ``ratio`` (training: the median over repetitions of samples/s relative to the
    bare loop for clip, relative to clip for the other defenses), and
    the issue's ``target`` and whether it is ``met`` where one applies."""
    grouped = frame.groupby(["stage", "variant", "measure"], sort=False)["value"]
    med = grouped.median().reset_index()
    med["lo"], med["hi"] = grouped.min().values, grouped.max().values
    med["ratio"], med["target"], med["met"] = float("nan"), "", None

    speed = frame[frame.measure == "samples_per_s"].pivot_table(index="repeat", columns="variant", values="value")
    for i, r in med.iterrows():
        if r.measure == "samples_per_s" and r.variant != BARE:
            ref, goal = (BARE, 0.95) if r.variant == "clip" else ("clip", 0.85)
            if ref in speed:  # the median of the ratios within each repetition: run minutes apart, not hours
                med.loc[i, "ratio"] = (speed[r.variant] / speed[ref]).median()
                med.loc[i, ["target", "met"]] = f">= {goal} x {ref.split()[0]}", med.loc[i, "ratio"] >= goal
        elif r.measure == "data_wait_share":
            med.loc[i, ["target", "met"]] = "<= 0.10 (step >= 90 %)", r.value <= 0.10
        elif r.measure in ("trigger_s", "poison_s"):
            med.loc[i, ["target", "met"]] = "<= 1 s", r.value <= 1.0
    return med


def write(frame: pd.DataFrame, folder: Path) -> Path:
    """Write ``frame`` atomically to ``folder/perf-<time>.parquet``; returns the path."""
    path = Path(folder) / f"perf-{time.strftime('%Y%m%d-%H%M%S')}.parquet"
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path
