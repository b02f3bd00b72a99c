"""Grids of cells: expand ``bench run``'s lists and sweeps into resolved configs, validate them all
before any training, and run each pending cell in its own process (``--jobs`` at a time)."""
from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, resolve
from .registry import ATTACKS, DATASETS, DEFENSES, build_params, param_fields
from .store import has_finished_row, is_running, runs_dir
from .utils import usable_cores

ALL = "all"
# `all` means every registered plugin whose class does not set ``poisons = False`` (the clean
# baseline, which is not an attack, sets it: attacks.base.Attack.poisons).

# A grid larger than this is almost certainly a typo (e.g. a seed range 0-100000).
MAX_CELLS = 10_000

# Exit codes of one cell's process (``bench cell``).
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_BUSY = 0, 1, 2, 75


def split_list(text: str) -> list[str]:
    """Split on commas outside brackets: ``"badnet[a=1,b=2],sig"`` -> ``["badnet[a=1,b=2]", "sig"]``.

    Raises ValueError for unbalanced brackets or an empty item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise ValueError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in {text!r}")
    items.append(text[start:])
    items = [s.strip() for s in items]
    if not all(items):
        raise ValueError(f"empty item in {text!r}")
    return items


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) or a mix -> distinct seeds in order; ValueError otherwise."""
    seeds: list[int] = []
    for item in split_list(str(text)):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"seed {item!r} is not a non-negative integer or a range like 0-4")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"seed range {item!r} is empty")
        if hi >= 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {hi}")
        if hi - lo >= MAX_CELLS:
            raise ValueError(f"seed range {item!r} has {hi - lo + 1} seeds; a grid may have at most {MAX_CELLS} cells")
        seeds += [s for s in range(lo, hi + 1) if s not in seeds]
    return seeds


def parse_name(spec: str) -> tuple[str, dict[str, str]]:
    """benchopt-style ``badnet[patch_size=4,location=random]`` -> ``("badnet", {...})``."""
    m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[(.*)\])?\s*", spec)
    if not m:
        raise ValueError(f"{spec!r} is not NAME or NAME[key=value,...]")
    return m.group(1), parse_assignments([p for p in (m.group(2) or "").split(",") if p.strip()])


def parse_assignments(items) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; ValueError for an item without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not NAME=VALUE")
        if key.strip() in out:
            raise ValueError(f"{key.strip()} is given twice; to sweep it, give one comma list: {key.strip()}=A,B")
        out[key.strip()] = value.strip()
    return out


# GridSpec.training keys -> the bench run / bench status option that sets them
TRAINING_OPTIONS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "model": "--model", "init": "--init"}


@dataclass
class GridSpec:
    """What ``bench run`` / ``bench status`` were asked for, before expansion: the one description
    of a grid, from the command line to the launchers and back to the follow-up commands
    (``command``), so that the cells they name are the cells that were run.

    Attributes:
        attacks, defenses: comma lists of names, each optionally ``NAME[k=v,...]``, or ``all``.
        seeds: ``"0,1,2"`` or ``"0-2"``.
        attack_params, defense_params, dataset_params: NAME -> comma list of values; each list is
            swept (the grid takes the product). An attack or defense sweep applies to the
            attacks/defenses that have the parameter.
        training: epochs, batch_size, lr, model overrides (None keeps the profile's) and init
            (the starting weights; absent: scratch).
        data, eval: ``--data``/``--eval``: strings for the parameters of the one registered
            dataset that claims ``--data`` (``cli_options``, ``datasets.base.Dataset``), e.g.
            training pairs from files and their evaluation set; None keeps the profile's data.
        finetune: ``--finetune-data``: the same dataset's clean fine-tuning source (its
            ``cli_options["finetune"]`` parameter), for post-training repairs; None for none.
        world_size: processes that train each cell together (``--nproc``; torchrun's WORLD_SIZE;
            the GPUs of a SLURM job), part of each cell since the global batch is
            batch_size x world_size.
        results: the results folder the cells are stored in.
    """

    attacks: str = "badnet"
    defenses: str = "clip"
    profile: str = "cpu-small"
    seeds: str = "0"
    attack_params: dict[str, str] = field(default_factory=dict)
    defense_params: dict[str, str] = field(default_factory=dict)
    dataset_params: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    eval: str | None = None
    world_size: int = 1
    results: str = "results"
    finetune: str | None = None

    def args(self) -> list[str]:
        """The ``bench run`` / ``bench status`` arguments that select this grid (``--results``
        included); parsed back by the CLI they give an equal GridSpec. Raises ValueError for a
        training setting that has no command-line option."""
        out = ["-a", self.attacks, "-d", self.defenses, "-p", self.profile, "-s", str(self.seeds)]
        for flag, params in (("-A", self.attack_params), ("-D", self.defense_params),
                             ("--dataset-param", self.dataset_params)):
            out += [a for k, v in params.items() for a in (flag, f"{k}={v}")]
        out += ["--data", self.data] if self.data is not None else []
        out += ["--eval", self.eval] if self.eval is not None else []
        out += ["--finetune-data", self.finetune] if self.finetune is not None else []
        for key, value in self.training.items():
            if value is None:
                continue
            if key not in TRAINING_OPTIONS:
                raise ValueError(f"training setting {key!r} has no command-line option; "
                                 f"those that do: {', '.join(TRAINING_OPTIONS)}")
            out += [TRAINING_OPTIONS[key], repr(value) if isinstance(value, float) else str(value)]
        out += ["--nproc", str(self.world_size)] if self.world_size != 1 else []
        return out + ["-r", str(self.results)]

    def command(self, name: str) -> list[str]:
        """The follow-up command line ``bench status`` (this grid's cells: done, running, ...) or
        ``bench report`` (the leaderboard of its results folder) as a list of arguments."""
        if name == "status":
            return ["bench", "status", *self.args()]
        if name == "report":
            return ["bench", "report", "-r", str(self.results)]
        raise ValueError(f"no follow-up command {name!r}; valid: status, report")

    def dataset(self) -> tuple[str | None, dict[str, str]]:
        """(dataset name or None for the profile's, its fixed parameters) from
        ``data``/``eval``/``finetune``."""
        if not (self.data or self.eval or self.finetune):
            return None, {}
        name, options = data_dataset()
        if not self.data:
            data_help = next((h for f, _, _, h in param_fields(DATASETS.get(name).Params) if f == options["data"]), "")
            flag = "--eval chooses the evaluation set" if self.eval else "--finetune-data gives the fine-tuning pairs"
            raise ValueError(f"{flag} of --data; give --data too ({data_help})")
        if self.eval and "eval" not in options:
            raise ValueError(f"--eval: dataset {name}, which takes --data, has no evaluation set option")
        if self.finetune and "finetune" not in options:
            raise ValueError(f"--finetune-data: dataset {name}, which takes --data, has no fine-tuning data option")
        given = (("data", self.data), ("eval", self.eval), ("finetune", self.finetune))
        return name, {options[k]: v for k, v in given if v}


def data_dataset() -> tuple[str, dict[str, str]]:
    """(name, ``cli_options``) of the registered dataset that claims ``--data`` (its
    ``cli_options`` has a ``"data"`` key). Raises ValueError when none or several do."""
    claims = [(n, DATASETS.get(n).cli_options) for n in DATASETS.names()
              if "data" in getattr(DATASETS.get(n), "cli_options", {})]
    if not claims:
        raise ValueError("--data: no registered dataset takes it (a dataset's cli_options)")
    if len(claims) > 1:
        raise ValueError(f"--data: several registered datasets claim it ({', '.join(n for n, _ in claims)}); "
                         "exactly one may (cli_options)")
    return claims[0]


def _names(text: str, registry, what: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for item in split_list(text):
        if item == ALL:
            out += [(n, {}) for n in registry.names() if getattr(registry.get(n), "poisons", True)]
        else:
            name, params = parse_name(item)
            registry.get(name)  # RegistryError listing the valid names
            out.append((name, params))
    if not out:
        raise ValueError(f"no {what} selected")
    return out


def _sweeps(params: dict[str, str]) -> list[dict[str, str]]:
    keys = list(params)
    values = [split_list(params[k]) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _applicable(sweep: dict[str, str], registry, name: str) -> dict[str, str]:
    fields = {f[0] for f in param_fields(registry.get(name).Params)}
    return {k: v for k, v in sweep.items() if k in fields}


def expand(spec: GridSpec) -> list[RunConfig]:
    """The distinct resolved configs of the grid, in order (attack, defense, sweeps, seed).

    A swept parameter that no selected attack (or defense) has is an error; attacks without it
    run with their default. Raises RegistryError or ValueError naming the problem.
    """
    for flag, params in (("-A/--attack-param", spec.attack_params), ("-D/--defense-param", spec.defense_params),
                         ("--dataset-param", spec.dataset_params)):
        for key, value in params.items():  # named here: split_list alone says "empty item in ''"
            if not value.strip():
                raise ValueError(f"{flag} {key}= gives parameter {key} no value; write {key}=VALUE "
                                 f"(a comma list {key}=A,B sweeps it)")
            try:
                split_list(value)
            except ValueError as e:
                raise ValueError(f"{flag} {key}={value}: {e}") from None
    attacks = _names(spec.attacks, ATTACKS, "attacks")
    defenses = _names(spec.defenses, DEFENSES, "defenses")
    for params, registry, chosen, what in ((spec.attack_params, ATTACKS, attacks, "attack"),
                                           (spec.defense_params, DEFENSES, defenses, "defense")):
        for key in params:
            if not any(_applicable({key: ""}, registry, n) for n, _ in chosen):
                names = sorted({n for n, _ in chosen})
                valid = sorted({f[0] for n in names for f in param_fields(registry.get(n).Params)})
                raise ValueError(f"no selected {what} ({', '.join(names)}) has a parameter {key!r}; "
                                 f"valid parameters: {', '.join(valid) or '(none)'}")
        for name, fixed in chosen:
            both = set(fixed) & set(params)
            if both:
                raise ValueError(f"{', '.join(sorted(both))} of {name} is given both in brackets and as a "
                                 f"--{what}-param; give it once")
    seeds = parse_seeds(spec.seeds)
    dataset, ds_fixed = spec.dataset()
    n_cells = len(attacks) * len(defenses) * len(seeds) * math.prod(
        len(split_list(v)) for v in [*spec.attack_params.values(), *spec.defense_params.values(),
                                      *spec.dataset_params.values()])
    if n_cells > MAX_CELLS:
        raise ValueError(f"the grid has {n_cells} cells; at most {MAX_CELLS} are allowed in one command")
    cfgs: dict[str, RunConfig] = {}
    for (a, a_fixed), (d, d_fixed) in itertools.product(attacks, defenses):
        for a_sweep, d_sweep, ds_sweep in itertools.product(
            _sweeps(spec.attack_params), _sweeps(spec.defense_params), _sweeps(spec.dataset_params)
        ):
            for seed in seeds:
                cfg = resolve(
                    a, d, spec.profile, seed,
                    {**a_fixed, **_applicable(a_sweep, ATTACKS, a)},
                    {**d_fixed, **_applicable(d_sweep, DEFENSES, d)},
                    {**ds_fixed, **ds_sweep}, dataset, spec.world_size, **spec.training,
                )
                cfgs.setdefault(cfg.run_id, cfg)
    return list(cfgs.values())


def validate(cfgs: list[RunConfig], device: str = "auto") -> list[str]:
    """Problems that would make cells fail before training (``runner.prepare``'s checks: data,
    parameters against the data, device, a global batch of batch_size x world_size pairs), as
    messages naming the cell; empty when all can run. The clean data is loaded once per dataset
    config and seed."""
    from .runner import ConfigError, prepare  # imports torch; `bench status` does not need it

    def key(cfg: RunConfig) -> tuple:
        return cfg.dataset, json.dumps(cfg.dataset_params, sort_keys=True), cfg.seed

    problems, loaded, data = [], None, None
    for cfg in sorted(cfgs, key=key):  # one clean bundle in memory at a time
        try:
            if key(cfg) != loaded:
                data, loaded = None, key(cfg)
                ds_cls = DATASETS.get(cfg.dataset)
                data = ds_cls(build_params(ds_cls.Params, cfg.dataset_params, f"dataset {cfg.dataset!r}")).load(cfg.seed)
            prepare(cfg, device, data=data, world_size=cfg.world_size)
        except (ConfigError, ValueError, FileNotFoundError, MemoryError) as e:
            problems.append(f"{describe(cfg)}: {type(e).__name__ + ': ' if isinstance(e, MemoryError) else ''}{e}")
    return problems


def describe(cfg: RunConfig) -> str:
    """Short human name of a cell: ``badnet x roclip seed 0 [n_poison=50]`` (non-default
    attack/defense parameters are not all shown; the run id identifies the cell)."""
    return f"{cfg.attack} x {cfg.defense} seed {cfg.seed} ({cfg.run_id})"


def state(cfg: RunConfig, results: str | Path) -> str:
    """``done``, ``running`` (another process holds its lock), ``failed`` or ``pending``."""
    if has_finished_row(results, cfg.run_id):
        return "done"
    if is_running(results, cfg.run_id):
        return "running"
    return "failed" if (runs_dir(results) / f"{cfg.run_id}.parquet").is_file() else "pending"


PARENT_ENV = "POISONBENCH_GRID_PID"


def _sigterm_on_parent_death() -> bool:
    """Ask Linux to send SIGTERM to this process when its parent dies; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """In a cell's process started by ``run_cells``: ask Linux to send SIGTERM to this process
    when the grid process dies (even by SIGKILL), so the cell records a failed row and frees its
    lock instead of running on orphaned. Under ``--nproc`` the parent is torchrun, which gets
    SIGTERM when the grid dies and passes it on. No-op elsewhere."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not _sigterm_on_parent_death():
        return
    if "LOCAL_RANK" in os.environ:  # started by torchrun, itself started by the grid
        return
    if os.getppid() != int(parent):  # the grid died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def cell_command(cfg: RunConfig, results: str | Path, device: str, force: bool, keep_checkpoint: bool,
                 quiet: bool) -> list[str]:
    """The command line that runs one cell in a fresh Python process, or, for a cell of
    ``cfg.world_size`` = N > 1 processes, in N processes on this node that train it together
    (torch.distributed DDP), started by ``python -m torch.distributed.run --standalone
    --nproc_per_node N``. ``device`` is ``auto``, ``cpu`` or ``cuda`` (with N > 1, process r uses
    cuda:r). A launcher for several nodes (e.g. SLURM) replaces the torchrun part and keeps
    ``-m poisonbench cell ...``.
    """
    nproc = cfg.world_size
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + ["-m", "poisonbench", "cell", json.dumps(cfg.to_dict()), "--results", str(results),
                      "--device", device]
    return cmd + ["--force"] * force + ["--keep-checkpoint"] * keep_checkpoint + ["--quiet"] * quiet


def torchrun_exit_code(cfg: RunConfig, results: str | Path, code: int) -> int:
    """The cell's exit code (EXIT_*) from that of torchrun, which exits 1 whatever its processes'
    codes were: EXIT_BUSY when another process holds the cell's lock, else ``code``."""
    if code != EXIT_OK and not has_finished_row(results, cfg.run_id) and is_running(results, cfg.run_id):
        return EXIT_BUSY
    return code


@dataclass
class CellOutcome:
    """How one cell's process ended: its config, exit code (EXIT_*; negative: killed by that
    signal) and log file (None when its output went to the terminal)."""

    cfg: RunConfig
    code: int
    log: Path | None


def run_cells(cfgs: list[RunConfig], results: str | Path, jobs: int = 1, device: str = "auto", force: bool = False,
              keep_checkpoint: bool = False, quiet: bool = False,
              on_done: Callable[[CellOutcome], None] | None = None) -> list[CellOutcome]:
    """Run each config in its own process (its ``world_size`` processes under torchrun, see
    ``cell_command``), ``jobs`` at a time; return their outcomes in order of completion (exit
    codes: 0 ok, 1 failed and recorded, 2 bad config, 75 busy elsewhere).

    With one job the cell's output (progress bar, result table) goes to this terminal; with more,
    to ``results/logs/<run_id>.log``. Each process gets ``cores // (jobs x world_size)`` CPU threads
    (unless OMP_NUM_THREADS is set), since oversubscribed OpenMP threads spin and slow everyone down.
    SIGTERM to this process is passed on to the cells, which record a failed row and resume next
    time; if this process is killed outright, Linux sends them SIGTERM too.
    """
    results = Path(results)
    nproc = max((c.world_size for c in cfgs), default=1)
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    if jobs * nproc > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // (jobs * nproc)))
    # torchrun is not ours to make die with this process: the kernel does it (its workers then
    # get SIGTERM from torchrun, and die with it too: die_with_parent)
    preexec = _sigterm_on_parent_death if nproc > 1 and sys.platform.startswith("linux") else None
    queue, running, outcomes = list(cfgs), {}, []

    def stop(signum, frame):
        raise SystemExit(128 + signum)  # the handler below passes SIGTERM on to the cells

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                cfg = queue.pop(0)
                log, out = None, None
                if jobs > 1:
                    log = results / "logs" / f"{cfg.run_id}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    out = open(log, "ab")
                cmd = cell_command(cfg, results, device, force, keep_checkpoint, quiet or jobs > 1)
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        preexec_fn=preexec if cfg.world_size > 1 else None)
                running[proc.pid] = (proc, cfg, log, out)
            pid, status = os.wait()
            if pid not in running:
                continue
            proc, cfg, log, out = running.pop(pid)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if cfg.world_size > 1:
                proc.returncode = torchrun_exit_code(cfg, results, proc.returncode)
            if out:
                out.close()
            outcome = CellOutcome(cfg, proc.returncode, log)
            outcomes.append(outcome)
            if on_done:
                on_done(outcome)
    except BaseException:
        for proc, _, _, _ in running.values():  # Ctrl-C or SIGTERM: let the cells record and exit
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _, _ in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcomes
