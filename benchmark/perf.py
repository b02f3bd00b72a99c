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
- data: decoded images/s of lazily loaded JPEG files and shards with 0, 1, 2, ... decoding
  worker processes (``perf_data``);
- the model's FLOPs per training sample (forward and backward, counted by torch's
  ``FlopCounterMode``) and the device's measured float32 matmul peak, whence each training
  variant's model FLOP utilisation (MFU);
- peak resident memory of the process after each stage.
"""
from __future__ import annotations

import copy
import functools
import dataclasses
import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .config import PROFILES, RunConfig, get_profile, resolve
from .preprocess import normalize
from .registry import ATTACKS, DATASETS, DEFENSES, build_params
from .speed import NAMES as SPEED_NAMES, SpeedOptions, is_convolutional
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
        stages: which of training, poisoning, eval, data to run.
        threads: PyTorch CPU threads; 0 = every usable core (as ``bench run``), unless
            OMP_NUM_THREADS is set.
        speed: also train clip with each of these speed options (``speed.SpeedOptions``) that
            applies to the profile's model.
        data_images: synthetic JPEGs the data stage decodes (``perf_data``; >= 256: two batches).
    """

    profile: str = "cpu-small"
    steps: int = 16
    epochs: int = 3
    repeats: int = 9
    poison_images: int = 0
    stages: tuple[str, ...] = ("training", "poisoning", "eval", "data")
    threads: int = 0
    speed: tuple[str, ...] = tuple(SPEED_NAMES)
    data_images: int = 2048


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
    from .models import create_model, image_size
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

    def trainer(defense: str, speed: SpeedOptions = SpeedOptions()) -> Callable[[bool], dict[str, float]]:
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
            r = train(copy.deepcopy(model0), tokenizer, run_pairs, d, run_cfg, torch.device("cpu"), None, progress=False,
                      speed=speed)
            return {"samples_per_s": r.steps * bs / r.train_s, "data_wait_share": r.data_wait_s / r.train_s,
                    "augment_share": r.augment_s / r.train_s}

        return go

    def bare(warm_up: bool) -> dict[str, float]:
        steps = 1 if warm_up else opts.steps * opts.epochs
        return {"samples_per_s": bare_loop(copy.deepcopy(model0), images, tokens, base, steps)}

    variants = {BARE: bare, **{d: trainer(d) for d in DEFENSE_NAMES}}
    for name in speed_names(model0, SpeedOptions.parse(",".join(opts.speed)).names()):
        variants[f"clip +{name}"] = trainer("clip", SpeedOptions.parse(name))
    for name, fn in list(variants.items()):
        try:
            fn(True)  # a warm-up; also compiles the compiled variant's model, once
        except Exception as e:  # e.g. compile without a working C++ compiler: measure the rest
            if "+" not in name:
                raise
            warnings.warn(f"bench perf: {name} cannot run here, left out ({type(e).__name__}: {str(e).splitlines()[0]})")
            del variants[name]
    task = progress.add_task("training throughput", total=len(variants) * opts.repeats)
    timed = {name: (lambda fn=fn: fn(False)) for name, fn in variants.items()}
    records = interleaved(timed, opts.repeats, lambda _: progress.advance(task))
    records += augmentation_parts(pairs.images[:bs], image_size(model0), opts)
    flops = {"variant": "model", "repeat": 0, "measure": "train_flops_per_sample",
             "value": train_flops_per_sample(copy.deepcopy(model0), images[:bs], tokens[:bs])}
    return records + [flops, {"variant": "device", "repeat": 0, "measure": "matmul_peak_flops", "value": matmul_peak()}]


def augmentation_parts(images: torch.Tensor, size: int, opts: PerfOptions) -> list[dict]:
    """Milliseconds per batch of each part of aug-only's image augmentation (the one RoCLIP uses
    too: flip, resized crop, colour jitter, grayscale, blur) to model inputs of side ``size`` on
    uint8 ``images`` [B, 3, H, W], each part given its real input (the views of the parts before it), interleaved over
    ``opts.repeats`` (variant "augment: <part>", measure "ms_per_batch"); and, for comparison, the
    colour jitter with kornia's own hue step in place of ``augment.adjust_hue`` (variant "augment:
    ColorJitter", measure "ms_per_batch_kornia_hue")."""
    import kornia.enhance

    from .augment import ColorJitter

    cls = DEFENSES.get("aug-only")
    cfg = resolve("none", "aug-only", profile=opts.profile)
    transform = cls(build_params(cls.Params, cfg.defense_params, "aug-only"), cfg.seed).train_transform(size)
    if transform is None:
        return []
    def ms(part, x) -> float:
        t0 = time.perf_counter()
        part(x)
        return 1000 * (time.perf_counter() - t0)

    x, variants = images.float() / 255.0, {}
    for part in transform.children():
        variants[f"augment: {type(part).__name__}"] = lambda part=part, x=x: {"ms_per_batch": ms(part, x)}
        if isinstance(part, ColorJitter):  # and the same draw with kornia's hue, right after
            stock = copy.deepcopy(part)
            stock._hue_fn = kornia.enhance.adjust_hue
            variants[f"augment: {type(part).__name__}"] = lambda part=part, stock=stock, x=x: {
                "ms_per_batch": ms(part, x), "ms_per_batch_kornia_hue": ms(stock, x)}
        x = part(x)
    return interleaved(variants, opts.repeats * 5)


def speed_names(model: torch.nn.Module, names) -> list[str]:
    """Those of the speed options ``names`` that apply to ``model`` (channels-last only to a
    convolutional one)."""
    return [n for n in names if n != "channels-last" or is_convolutional(model)]


def train_flops_per_sample(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> float:
    """Floating-point operations of one CLIP training step's forward and backward pass per pair
    (a multiply-add counts 2), counted by ``torch.utils.flop_counter.FlopCounterMode`` on the batch
    of float images [B, 3, S, S] and int64 tokens [B, L]; the optimizer step is not counted."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as counter:
        image_emb, text_emb, scale = model(images, tokens)
        open_clip.ClipLoss()(image_emb, text_emb, scale).backward()
    return counter.get_total_flops() / len(images)


def matmul_peak(seconds: float = 0.5) -> float:
    """The device's achievable float32 FLOP/s: the best of square ``torch.mm`` of sides 512 to
    2048 on the CPU with the current threads, each repeated for ``seconds``."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            k += 1
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best


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


def data_measurements(opts: PerfOptions, progress) -> list[dict]:
    """Decoded images/s of the lazy CSV and WebDataset paths with 0 (a thread), 1, 2, ... worker
    processes, interleaved, on ``opts.data_images`` synthetic JPEGs (``perf_data.decode_variants``)."""
    from .perf_data import decode_variants

    with decode_variants(opts.data_images) as (variants, size):
        task = progress.add_task(f"decoding {opts.data_images} JPEGs at {size} px", total=len(variants) * opts.repeats)
        return interleaved(variants, opts.repeats, lambda _: progress.advance(task))


BARE = "bare loop"  # the hand-written open_clip loop
STAGES = {"training": training_measurements, "poisoning": poisoning_measurements, "eval": eval_measurements,
          "data": data_measurements}


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
    SpeedOptions.parse(",".join(opts.speed))  # ValueError for an unknown option
    if "data" in opts.stages and opts.data_images < 256:
        raise ValueError(f"--data-images {opts.data_images}: the data stage times batches of 128 from the first to the last; give 256 or more")
    if _takes_data(profile.dataset) and set(opts.stages) - {"data"}:
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
            ref, goal = (BARE, 0.95) if r.variant == "clip" else (BARE, None) if "+" in r.variant else ("clip", 0.85)
            if ref in speed:  # the median of the ratios within each repetition: run minutes apart, not hours
                med.loc[i, "ratio"] = (speed[r.variant] / speed[ref]).median()
                if goal is not None:
                    med.loc[i, ["target", "met"]] = f">= {goal} x {ref.split()[0]}", med.loc[i, "ratio"] >= goal
        elif r.measure == "data_wait_share":
            med.loc[i, ["target", "met"]] = "<= 0.10 (step >= 90 %)", r.value <= 0.10
        elif r.measure in ("trigger_s", "poison_s"):
            med.loc[i, ["target", "met"]] = "<= 1 s", r.value <= 1.0
    return pd.concat([med, mfu_rows(med), decode_ratios(frame)], ignore_index=True)


def mfu_rows(med: pd.DataFrame) -> pd.DataFrame:
    """Model FLOP utilisation of each training variant: median samples/s x FLOPs per sample /
    the measured matmul peak (``measure`` "mfu"; ``value`` in [0, 1]); none without the figures."""
    pick = lambda measure: med.loc[med.measure == measure, "value"]
    flops, peak = pick("train_flops_per_sample"), pick("matmul_peak_flops")
    if flops.empty or peak.empty:
        return pd.DataFrame()
    rates = med[(med.stage == "training") & (med.measure == "samples_per_s")]
    return pd.DataFrame({"stage": "training", "variant": rates.variant, "measure": "mfu",
                         "value": rates.value * flops.iloc[0] / peak.iloc[0], "target": ""})


def decode_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """For the data stage: each worker count's images/s over one worker's (``ratio``, the median of
    per-repetition ratios; 2 workers: target >= 1.8), per source (csv, wds)."""
    rates = frame[(frame.stage == "data") & (frame.measure == "images_per_s")]
    if rates.empty:
        return pd.DataFrame()
    wide = rates.pivot_table(index="repeat", columns="variant", values="value")
    out = []
    for variant in wide.columns:
        source, _, workers = variant.partition(", ")
        one = f"{source}, 1 worker"
        if workers.endswith("workers") and one in wide:
            ratio = (wide[variant] / wide[one]).median()
            two = workers == "2 workers"
            out.append({"stage": "data", "variant": variant, "measure": "speedup_vs_1_worker", "value": ratio,
                        "target": ">= 1.8" if two else "", "met": bool(ratio >= 1.8) if two else None})
    return pd.DataFrame(out)


def write(frame: pd.DataFrame, folder: Path) -> Path:
    """Write ``frame`` atomically to ``folder/perf-<time>.parquet``; returns the path."""
    path = Path(folder) / f"perf-{time.strftime('%Y%m%d-%H%M%S')}.parquet"
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path
