"""Run one cell: load data, poison, train with a defense, evaluate, write one result row.

How a cell trains depends on its defense's kind (``defenses.base``; dispatched on ``kind``, never
on a name): a training-time defense or a task trains a fresh model on the poisoned data; a data
filter scores the poisoned pairs with the cached undefended model, keeps some and trains a fresh
undefended CLIP on them; a post-training repair fine-tunes the cached undefended model on the
dataset's clean fine-tuning split. The cached undefended model (``undefended_model``) is the model
of the undefended cell (``defenses.base.UNDEFENDED``) with the same attack, data, settings and
seed, stored under ``RESULTS/cache/<its run_id>/`` (benchopt's cached cells).
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed
from .attacks.base import CLEAN, Attack, AttackContext, PoisonPlan
from .config import RunConfig, get_profile, resolve
from .datasets.base import DatasetBundle
from .defenses.base import KINDS, UNDEFENDED, DefenseBase, DiagnosticRows
from .detection import detection_metrics
from .curves import curve_columns, epoch_metrics, zero_shot_model
from .evaluate import encode_images, encode_texts, topk_accuracy, topk_classes
from .metrics import linear_probe, linear_probe_paper, retrieval_recall
from .export import model_dir, save_model
from .models import create_model, image_size, init_file, load_init
from .preprocess import eval_geometry
from .registry import ATTACKS, DATASETS, DEFENSES, build_params
from .survival import TriggerSurvival
from .store import CellBusyError, cache_lock, cell_lock, has_finished_row, read_row, runs_dir, write_row
from .speed import from_env as speed_from_env
from .train import TrainResult, set_threads, train
from .utils import atomic_write, derive_seed, hash_json, remove_temp_files


class ConfigError(ValueError):
    """The configuration cannot run on this data (raised before any training)."""


@dataclass
class Cell:
    """A prepared cell: its config, data, attack, poisoned training set, defense and device, the
    dataset object (for its optional hooks, ``datasets.base.Dataset``; None: no hooks) and, once
    ``execute`` has made it, the file of its clean model (``clean_model``; for ``--init clean``
    and attacks whose surrogate it is)."""

    cfg: RunConfig
    data: DatasetBundle
    attack: Attack
    plan: PoisonPlan
    defense: DefenseBase
    device: torch.device
    dataset: Any = None
    clean_model: Path | None = None

    def watchers(self, tokenizer, index: torch.Tensor | None = None, survival: bool = True) -> dict[str, Any]:
        """``train``'s ``epoch_metrics`` and ``view_probe`` for this cell: per-epoch curves on the
        profile's ``curve_n`` evaluation images, and (``survival``) the trigger-survival probe over
        the poisoned views of the training rows ``index`` of ``plan.train`` (default: all)."""
        views = self.attack.trigger_views(self.data, self.plan) if survival else None
        probe = None if views is None else TriggerSurvival(views, len(self.plan.train), index=index)
        return {"epoch_metrics": epoch_metrics(self, tokenizer, get_profile(self.cfg.profile).curve_n, probe),
                "view_probe": probe}


def prepare(cfg: RunConfig, device: str = "auto", data: DatasetBundle | None = None,
            world_size: int | None = None) -> Cell:
    """Check the device, load the data (unless ``data``, the clean bundle of this dataset config
    and seed, is given), build the attack and defense and poison the training set.
    ``world_size``: the processes that will train it (default: those of this process group, else
    torchrun's WORLD_SIZE, else 1); it must be the ``cfg.world_size`` the cell was resolved with,
    since the global batch (batch_size x world_size) is part of the cell. The training set must
    hold one global batch.

    Raises ConfigError (with the problem and the valid choices) for anything that would make the
    run fail, so bad input never starts training and never writes to the store.
    """
    if world_size is None:
        world_size = distributed.world_size() if distributed.is_initialized() else distributed.launched_world_size()
    if world_size != cfg.world_size:
        raise ConfigError(f"cell {cfg.run_id} is the cell of {cfg.world_size} process(es) (global batch "
                          f"{cfg.batch_size} x {cfg.world_size}), but {world_size} would train it; resolve it with "
                          f"world_size={world_size} (`bench run --nproc {world_size}`; under torchrun, `bench run` "
                          "takes WORLD_SIZE itself)")
    try:
        dev = pick_device(device)
        ds_cls = DATASETS.get(cfg.dataset)
        dataset = ds_cls(build_params(ds_cls.Params, cfg.dataset_params, f"dataset {cfg.dataset!r}"))
        attack_cls, defense_cls = ATTACKS.get(cfg.attack), DEFENSES.get(cfg.defense)
        attack = attack_cls(build_params(attack_cls.Params, cfg.attack_params, f"attack {cfg.attack!r}"), cfg.seed)
        defense = defense_cls(build_params(defense_cls.Params, cfg.defense_params, f"defense {cfg.defense!r}"), cfg.seed)
        data = data if data is not None else dataset.load(cfg.seed)
        attack.check(data)
        plan = attack.poison(data)
        defense.check(len(plan.train))
        defense.check_run(cfg)
        init_file(cfg.init, cfg.model)  # the starting weights exist (FileNotFoundError says where they go)
        if attack.model_init() is not None:
            try:
                init_file(attack.model_init(), cfg.model)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"attack {cfg.attack}, its model ({attack.model_init()}): {e}") from None
        check_kind(cfg, defense, dataset, data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    if attack.poisons and plan.n_poison == 0:  # its ASR would be that of a clean model
        raise ConfigError(f"attack {cfg.attack}: these parameters poison 0 training pairs; raise the attack's "
                          f"poison count (or run the clean baseline)")
    world = cfg.world_size
    if len(plan.train) < cfg.batch_size * world:
        per = f" ({cfg.batch_size} per process x {world} processes)" if world > 1 else ""
        raise ConfigError(f"{len(plan.train)} training pairs are fewer than one batch of {cfg.batch_size * world}{per}")
    return Cell(cfg, data, attack, plan, defense, dev, dataset)


def check_kind(cfg: RunConfig, defense: DefenseBase, dataset: Any, data: DatasetBundle) -> None:
    """ValueError when the defense's kind cannot run this cell: an unknown kind; a filter or a
    repair with several processes (not supported yet); a repair without a clean fine-tuning split
    (the message says how to give one) or with fewer fine-tuning pairs than one batch of its phase."""
    kind = getattr(defense, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"defense {cfg.defense}: unknown kind {kind!r}; a defense subclasses one of the kinds of "
                         f"poisonbench.defenses.base ({', '.join(KINDS)})")
    if kind in ("filter", "repair") and cfg.world_size > 1:
        raise ValueError(f"defense {cfg.defense} is a {kind} defense, which runs in one process only for now; "
                         "drop --nproc")
    if kind == "repair":
        if data.finetune is None:
            option = getattr(dataset, "cli_options", {}).get("finetune")
            how = (f"give clean pairs with --finetune-data csv:PATH|wds:URLS (dataset parameter {option})" if option
                   else f"set the dataset's fine-tuning size (see `bench list datasets`, {cfg.dataset})")
            raise ValueError(f"defense {cfg.defense} repairs a trained model by fine-tuning it on clean pairs, but "
                             f"dataset {cfg.dataset} gives no fine-tuning split; {how}")
        phase = defense.phase(cfg)
        if len(data.finetune) < phase.batch_size:
            raise ValueError(f"defense {cfg.defense}: the {len(data.finetune)} fine-tuning pairs are fewer than one "
                             f"batch of {phase.batch_size}; give more fine-tuning pairs or a smaller batch")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``; ``cuda`` or ``cuda:N``. Under torchrun
    a CUDA device is ``cuda:LOCAL_RANK`` (``distributed.local_device``).

    Raises ValueError for an unknown device or a GPU that is not there.
    """
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"), name)
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; valid devices: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here (cuda:0..)")
    elif dev.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; valid devices: auto, cpu, cuda, cuda:N")
    return distributed.local_device(dev, name)


def git_rev() -> str:
    """The source tree's git commit (with ``-dirty`` when the package's own files have local
    changes: results, docs or a README edited beside a running grid do not count), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        source = [":/benchmark", ":/attacks", ":/defenses", ":/datasets", ":/pyproject.toml"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *source], cwd=here, capture_output=True,
                               text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_cell(cfg: RunConfig, results: Path, device: str = "auto", progress: bool = True,
             keep_checkpoint: bool = False, force: bool = False) -> dict[str, Any]:
    """``prepare`` then ``execute`` one cell; see both."""
    return execute(prepare(cfg, device), results, progress, keep_checkpoint, force)


def execute(cell: Cell, results: Path, progress: bool = True, keep_checkpoint: bool = False,
            force: bool = False) -> dict[str, Any] | None:
    """Train and evaluate a prepared cell and write its row to ``results/runs/<run_id>.parquet``,
    holding the cell's lock (``store.cell_lock``) throughout.

    Returns the row; when the store already holds a finished row for the cell (another process
    may have finished it meanwhile), that row, without training, unless ``force``, which also
    discards the cell's checkpoint. A failure (Ctrl-C included) writes a row with status=failed
    and the error when the store is writable, then re-raises. The end-of-epoch checkpoint
    (``results/checkpoints/<run_id>/last.pt``) lets an interrupted cell resume; it is deleted once
    the row is written unless ``keep_checkpoint``. Temp files that a writer killed mid-write (kill
    -9) left beside the cell's row, manifest or checkpoint are removed once the lock is held.
    Raises CellBusyError, writing nothing, when another process is running the same cell.

    In a process group (torchrun; ``distributed``) every rank calls this. Rank 0 alone does all of
    the above and tells the others whether to train; they train along (``train``) and return None,
    writing nothing. A failure on any rank ends every rank's training (torchrun stops the others),
    and rank 0 records the failed row.
    """
    results = Path(results)
    ckpt = results / "checkpoints" / cell.cfg.run_id / "last.pt"
    if not distributed.broadcast_object(not force and has_finished_row(results, cell.cfg.run_id)):
        start(cell, results, progress)
    if not distributed.is_main():
        if distributed.broadcast_object(None) == "train":  # "cached": rank 0 evaluates the cached model alone
            _train(cell, ckpt, progress=False)
        return None
    told = False

    def tell(decision: str) -> None:  # to the other ranks: train, or stop (done, busy, error)
        nonlocal told
        told = True
        distributed.broadcast_object(decision)

    try:
        with cell_lock(results, cell.cfg.run_id):
            # Every writer of the cell's row, manifest and checkpoint holds this lock, so temp files
            # beside them are those of a writer that was killed mid-write: remove them.
            run_id = cell.cfg.run_id
            for path in (runs_dir(results) / f"{run_id}.parquet", manifest_file(results, run_id), ckpt):
                remove_temp_files(path)
            if not force and has_finished_row(results, cell.cfg.run_id):
                tell("done")
                return read_row(results, cell.cfg.run_id)
            if force:
                ckpt.unlink(missing_ok=True)
            # The undefended cell evaluates the cached model when there is one (all ranks agree on
            # that before training: the other processes train along or not at all); --force retrains it.
            cached = None  # one process: decided under the cache's lock
            if is_undefended(cell.cfg) and (force or distributed.world_size() > 1):
                cached = not force and cached_model(results, cell.cfg, cell.plan) is not None
            tell("cached" if cached else "train")
            return _execute(cell, results, ckpt, progress, keep_checkpoint, cached)
    finally:
        if not told:  # the cell is busy elsewhere, or the store failed: the other ranks must not wait
            distributed.broadcast_object("stop")


def manifest_file(results: Path, run_id: str) -> Path:
    """Where cell ``run_id``'s poisoning manifest is written under ``results``."""
    return Path(results) / "manifests" / f"{run_id}.json"


def write_poisoned_set(cell: Cell, results: Path) -> Path | None:
    """The file the dataset's optional ``write_poison`` hook (``datasets.base.Dataset``) wrote the
    cell's poisoned pairs to, under ``results/poison/<run_id>``; None when the attack poisoned no
    pair or the dataset has no such hook (or wrote nothing)."""
    hook = getattr(cell.dataset, "write_poison", None)
    if hook is None or not cell.plan.n_poison:
        return None
    written = hook(cell.plan.train, Path(results) / "poison" / cell.cfg.run_id)
    return None if written is None else Path(written)


def _train(cell: Cell, ckpt: Path, progress: bool, index: torch.Tensor | None = None, defense=None):
    """A fresh model (seeded by the cell's seed, the same on every rank) trained on the rows
    ``index`` of the poisoned training set (default: all) with ``defense`` (default: the cell's):
    (model, tokenizer, TrainResult)."""
    data = None if index is None else cell.plan.train.subset(index)
    model, tokenizer = fresh_model(cell)
    return model, tokenizer, train(model, tokenizer, cell.plan.train if data is None else data,
                                   cell.defense if defense is None else defense, cell.cfg, cell.device, ckpt, progress,
                                   **cell.watchers(tokenizer, index))


def fresh_model(cell: Cell):
    """(model, tokenizer): the cell's architecture with its starting weights: those of ``--init``
    (``models.load_init``), or for ``scratch`` the random initial weights of its seed."""
    if cell.device.type == "cpu":
        set_threads()
    torch.manual_seed(derive_seed(cell.cfg.seed, "model"))
    model, tokenizer = create_model(cell.cfg.model)
    load_init(model, cell.cfg.init, cell.cfg.model, cell.clean_model)
    return model, tokenizer


# --- a cell's clean model and its attack's model ----------------------------------------------

def clean_config(cfg: RunConfig) -> RunConfig:
    """The config of ``cfg``'s clean model (``--init clean``; the default surrogate of an attack
    that needs a model): the undefended cell of attack ``none``, from scratch, in the pre-training
    profile of ``cfg``'s profile (``Profile.pretrain``, else the profile itself; its training
    settings, not ``cfg``'s), with ``cfg``'s data (dataset and parameters: ``--data``,
    ``--dataset-param``), seed, world size and model. It is a cell like any other (``bench run -a
    none -d clip -p cpu-small`` is the clean model of cpu-small-ft), so its row gives the clean
    model's accuracy."""
    base = get_profile(get_profile(cfg.profile).pretrain or cfg.profile)
    return resolve(CLEAN, UNDEFENDED, base.name, cfg.seed, dataset=cfg.dataset, dataset_params=cfg.dataset_params,
                   world_size=cfg.world_size, model=None if cfg.model == base.model else cfg.model, init="scratch")


def readable(path: Path) -> bool:
    """True when ``path`` loads with ``torch.load(weights_only=True)`` (a file cut short by a full
    disk or a copy does not)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure to read means: make it again
        return False


def clean_model(cell: Cell, results: Path, progress: bool) -> Path:
    """The file of ``cell``'s clean model (``clean_config``), ``RESULTS/cache/<its run id>/model.pt``:
    that cell is run first (by every rank of a process group together; waiting while another
    process runs it) unless its row and a readable model are already there; a row whose model is
    missing or unreadable is trained again. Raises what running it raises."""
    ccfg = clean_config(cell.cfg)
    path = cache_dir(results, ccfg.run_id) / "model.pt"
    while True:
        busy = False
        redo = distributed.broadcast_object(has_finished_row(results, ccfg.run_id)
                                            and not (path.is_file() and readable(path)))
        if redo:
            warnings.warn(f"the clean model {path} is missing or unreadable: training it again")
        try:
            execute(prepare(ccfg, str(cell.device)), results, progress, force=redo)
        except CellBusyError:
            busy = True
        if not distributed.broadcast_object(busy):
            break
        time.sleep(5)
    if not path.is_file():
        raise RuntimeError(f"the clean model {path} was not written; run `bench run -a {CLEAN} -d {ccfg.defense} "
                           f"-p {ccfg.profile} -s {ccfg.seed}` and look at its error")
    return path


def attack_context(cell: Cell, results: Path) -> AttackContext:
    """The ``AttackContext`` of ``cell``'s attack: its surrogate is the cell's architecture with the
    weights ``attack.model_init()`` names (``clean``: ``cell.clean_model``); a cached computation is
    keyed by the data, the seed, those weights, the attack and the parameters it says the
    computation depends on (all of them by default; not the defense: one computation serves every
    defense's cell). A cached file that cannot be read is computed again."""
    cfg, spec = cell.cfg, cell.attack.model_init()
    ident = cfg.to_dict()  # parameters at their defaults spelled as in every other cell (config.identity)

    def surrogate():
        model, tokenizer = create_model(cfg.model)
        load_init(model, spec, cfg.model, cell.clean_model)
        return model.to(cell.device).eval().requires_grad_(False), tokenizer

    def cached(name: str, compute, depends_on: dict | None = None):
        what = {"dataset": cfg.dataset, "dataset_params": ident["dataset_params"], "seed": cfg.seed,
                "model": cfg.model, "surrogate": clean_config(cfg).run_id if spec == "clean" else spec,
                "attack": cfg.attack, "attack_params": ident["attack_params"] if depends_on is None else depends_on,
                "name": name}
        key = f"attack-{hash_json(what)[:16]}"
        path = Path(results) / "cache" / key / f"{name}.pt"
        if distributed.is_main():
            with cache_lock(results, key):
                remove_temp_files(path)
                if path.is_file() and not readable(path):
                    warnings.warn(f"{path} cannot be read: computing it again")
                    path.unlink()
                if not path.is_file():
                    out = compute()
                    if not (isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())):
                        raise TypeError(f"attack {cfg.attack}: what it caches as {name!r} must be a dict of tensors")
                    atomic_write(path, lambda tmp: torch.save(to_cpu(out), tmp))
                    atomic_write(path.parent / "what.json", lambda tmp: Path(tmp).write_text(json.dumps(what, indent=1)))
        distributed.barrier()  # the other ranks load what rank 0 wrote
        return torch.load(path, map_location="cpu", weights_only=True)

    return AttackContext(cell.device, surrogate, cached)


def start(cell: Cell, results: Path, progress: bool) -> None:
    """What a cell needs before it trains, on every rank: its clean model when it starts from it
    or its attack uses it, then, for an attack that needs a model, the poisoned data made with it
    (``Attack.poison`` with an ``AttackContext``; ``prepare`` made the plan without one). A failure
    is recorded as the cell's failed row (unless it has a finished one) and raised."""
    spec = cell.attack.model_init()
    try:
        if "clean" in (cell.cfg.init, spec):
            cell.clean_model = clean_model(cell, results, progress)
        if spec is not None:
            cell.plan = cell.attack.poison(cell.data, attack_context(cell, results))
    except BaseException as e:
        if distributed.is_main() and not has_finished_row(results, cell.cfg.run_id):
            row = base_row(cell.cfg, cell.plan, cell.device)
            row.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                       finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            try:
                write_row(row, results)
            except OSError:
                pass  # the store cannot take it: the error itself is raised below
        raise


# --- the cached undefended model -------------------------------------------------------------

def undefended_config(cfg: RunConfig) -> RunConfig:
    """The config of the undefended cell (``defenses.base.UNDEFENDED``, plain CLIP, with its
    profile's parameters) of the same attack, attack parameters, dataset, profile, training
    settings, world size and seed as ``cfg``: its run id keys the cached undefended model."""
    params = get_profile(cfg.profile).defense_params.get(UNDEFENDED, {})
    return dataclasses.replace(cfg, defense=UNDEFENDED, defense_params=dataclasses.asdict(DEFENSES.params(UNDEFENDED, params)))


def is_undefended(cfg: RunConfig) -> bool:
    """True for the undefended cell itself (it saves its model to the cache and reuses it)."""
    return undefended_config(cfg).run_id == cfg.run_id


def cache_dir(results: Path, run_id: str) -> Path:
    """Folder of the cached model of cell ``run_id``: ``model.pt`` (the state dict),
    ``optimizer.pt`` (the ``state_dict()`` of the AdamW at the end of its training, over
    ``train.param_groups`` of the model; a cache written before it was stored has none) and
    ``model.json`` (what it is: the cell's config, its poisoned data's manifest hash, steps, loss)."""
    return Path(results) / "cache" / run_id


def cached_model(results: Path, ucfg: RunConfig, plan: PoisonPlan) -> dict[str, Any] | None:
    """The cache's description (``model.json``) of undefended cell ``ucfg``'s model, or None
    when it holds none, or one trained on other poisoned data (another manifest hash, warned)."""
    folder = cache_dir(results, ucfg.run_id)
    info_path, model_path = folder / "model.json", folder / "model.pt"
    if not (info_path.is_file() and model_path.is_file()):
        return None
    info = json.loads(info_path.read_text())
    if info.get("config_hash") != ucfg.config_hash or info.get("manifest_hash") != plan.manifest_hash():
        warnings.warn(f"the cached model {model_path} was trained on other data or settings; training it again")
        return None
    return info


@dataclass
class StartModel:
    """The cached undefended model as a cell receives it.

    Attributes:
        model, tokenizer: the trained model (on the cell's device) and its tokenizer.
        run_id: the undefended cell's run id (the row's ``start_model``).
        info: the cache's description (``cached_model``): steps, final_loss, train_s, ...
        result: the TrainResult when this call trained it, None when it was loaded.
        optimizer_state: the ``state_dict()`` of the AdamW that trained it (tensors on the CPU),
            None when the cache holds none (written before it was stored).
    """

    model: torch.nn.Module
    tokenizer: Any
    run_id: str
    info: dict[str, Any]
    result: TrainResult | None
    optimizer_state: dict | None = None


def undefended_model(cell: Cell, results: Path, progress: bool, ckpt: Path | None = None,
                     cached: bool | None = None, optimizer: bool = False) -> StartModel:
    """The undefended model of ``cell``'s poisoned data and its AdamW's final state: loaded from
    the cache (``RESULTS/cache/<undefended run_id>/model.pt`` and ``optimizer.pt``,
    ``torch.load(weights_only=True)``), or trained from the seed's initial weights with the
    undefended defense's hooks and written there atomically, holding the cache's lock
    (``store.cache_lock``) throughout, so that a model is trained once however many cells need it.

    ``ckpt``: the checkpoint of that training (default ``cache/<run_id>/last.pt``, removed once
    the model is written); the undefended cell itself passes its own, and its defense trains.
    ``cached``: True/False to load/train regardless of the cache (ranks of a process group
    decided it together), None to decide under the lock. ``optimizer``: also return the AdamW's
    state (``StartModel.optimizer_state``; a repair starts its fine-tuning from it), else None."""
    ucfg = undefended_config(cell.cfg)
    folder = cache_dir(results, ucfg.run_id)
    own_ckpt = ckpt is None
    ckpt = folder / "last.pt" if own_ckpt else ckpt
    with cache_lock(results, ucfg.run_id):
        for name in ("model.pt", "optimizer.pt", "model.json") + (("last.pt",) if own_ckpt else ()):
            remove_temp_files(folder / name)
        info = cached_model(results, ucfg, cell.plan) if cached is not False else None
        if cached and info is None:  # the other processes were told not to train along
            raise RuntimeError(f"the cached model {folder / 'model.pt'} disappeared; run the cell again")
        model, tokenizer = fresh_model(cell)
        if info is not None:
            model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
            opt = folder / "optimizer.pt"
            opt_state = torch.load(opt, map_location="cpu", weights_only=True) if optimizer and opt.is_file() else None
            return StartModel(model.to(cell.device), tokenizer, ucfg.run_id, info, None, opt_state)
        defense = cell.defense if is_undefended(cell.cfg) else DEFENSES.get(UNDEFENDED)(
            build_params(DEFENSES.get(UNDEFENDED).Params, ucfg.defense_params, f"defense {UNDEFENDED!r}"), ucfg.seed)
        result = train(model, tokenizer, cell.plan.train, defense, ucfg, cell.device, ckpt, progress,
                       keep_optimizer_state=True, **cell.watchers(tokenizer))
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        opt_state = to_cpu(result.optimizer_state)
        result.optimizer_state = None  # kept here, not in the result the row is made from
        # both before model.json, which marks the cache complete (cached_model)
        atomic_write(folder / "optimizer.pt", lambda tmp: torch.save(opt_state, tmp))
        atomic_write(folder / "model.pt", lambda tmp: torch.save(state, tmp))
        info = {"what": "the undefended model of the cell run_id, trained on its poisoned data",
                "run_id": ucfg.run_id, "config_hash": ucfg.config_hash, "config": ucfg.to_dict(),
                "manifest_hash": cell.plan.manifest_hash(), "steps": result.steps, "final_loss": result.final_loss,
                "train_s": result.train_s, "history": result.history, "git_rev": git_rev(), "version": __version__,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write(folder / "model.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
        if own_ckpt:
            ckpt.unlink(missing_ok=True)
        return StartModel(model, tokenizer, ucfg.run_id, info, result, opt_state if optimizer else None)


def to_cpu(obj):
    """``obj`` (nested dicts, lists and tuples of tensors and plain values, e.g. an optimizer's
    ``state_dict()``) with every tensor detached and copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# --- one cell, by its defense's kind --------------------------------------------------------

def _train_training(cell: Cell, results: Path, ckpt: Path, progress: bool, row: dict, cached: bool | None):
    """Training-time and task defenses: a fresh model trained on the poisoned data. The
    undefended cell goes through the cache: it saves its model there, or evaluates the cached
    one (``start_model`` = its own run id) without training."""
    if not is_undefended(cell.cfg):
        model, tokenizer, result = _train(cell, ckpt, progress)
        return model, tokenizer, result
    start = undefended_model(cell, results, progress, ckpt, cached)
    if start.result is None:
        row["start_model"] = start.run_id
        return start.model, start.tokenizer, TrainResult(start.info["steps"], start.info["final_loss"], 0.0, 0,
                                                         history=start.info.get("history", []))
    return start.model, start.tokenizer, start.result


def _train_filter(cell: Cell, results: Path, ckpt: Path, progress: bool, row: dict, cached: bool | None):
    """Data filters: score the poisoned pairs with the cached undefended model, keep what the
    filter keeps, train a fresh undefended CLIP on the kept pairs; detection metrics and counts
    into the row."""
    data, name = cell.plan.train, cell.cfg.defense
    start = undefended_model(cell, results, progress)
    row.update(start_model=start.run_id, start_model_train_s=start.result.train_s if start.result else 0.0)
    start.model.eval()
    t0 = time.perf_counter()
    scores = cell.defense.score(start.model, start.tokenizer, data, cell.device)
    row["score_s"] = time.perf_counter() - t0
    if not (isinstance(scores, torch.Tensor) and scores.shape == (len(data),) and scores.is_floating_point()):
        raise ValueError(f"defense {name}: score() must return float [{len(data)}], got "
                         f"{getattr(scores, 'dtype', type(scores).__name__)} {tuple(getattr(scores, 'shape', ()))}")
    scores = scores.detach().float().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError(f"defense {name}: score() returned {int((~torch.isfinite(scores)).sum())} non-finite scores")
    kept = cell.defense.keep(scores)
    if not (isinstance(kept, torch.Tensor) and kept.dtype == torch.bool and kept.shape == (len(data),)):
        raise ValueError(f"defense {name}: keep() must return bool [{len(data)}]")
    row.update(n_kept=int(kept.sum()), n_filtered=len(data) - int(kept.sum()))
    row.update(detection_metrics(scores, data.is_poison, kept))  # the det_* columns
    if int(kept.sum()) < cell.cfg.batch_size:
        raise ValueError(f"defense {name} kept {int(kept.sum())} pairs, fewer than one batch of {cell.cfg.batch_size}")
    del start
    ucfg = undefended_config(cell.cfg)
    clip = DEFENSES.get(UNDEFENDED)(build_params(DEFENSES.get(UNDEFENDED).Params, ucfg.defense_params,
                                                 f"defense {UNDEFENDED!r}"), cell.cfg.seed)
    return _train(cell, ckpt, progress, kept.nonzero().squeeze(1), clip)


def _train_repair(cell: Cell, results: Path, ckpt: Path, progress: bool, row: dict, cached: bool | None):
    """Post-training repairs: fine-tune the cached undefended model on the clean fine-tuning
    split, in the repair's own phase (settings, hooks, checkpoint) of the one training loop; a
    task's ``start_optimizer`` receives the undefended model's final AdamW state."""
    start = undefended_model(cell, results, progress, optimizer=True)
    row.update(start_model=start.run_id, start_model_train_s=start.result.train_s if start.result else 0.0)
    phase = cell.defense.phase(cell.cfg)
    row["n_finetune"] = len(cell.data.finetune)  # the phase's settings are the defense's parameters (p_defense_*)
    result = train(start.model, start.tokenizer, cell.data.finetune, cell.defense.training(), cell.cfg, cell.device,
                   ckpt, progress, phase=phase, optimizer_state=start.optimizer_state,
                   **cell.watchers(start.tokenizer, survival=False))  # clean fine-tuning pairs: no trigger to follow
    return start.model, start.tokenizer, result


TRAIN_BY_KIND = {"training": _train_training, "task": _train_training, "filter": _train_filter, "repair": _train_repair}


def defense_columns(defense: DefenseBase) -> dict[str, Any]:
    """The defense's own numbers (``metrics()``) as ``d_<key>`` columns. Raises ValueError for a
    key that is not a plain name or a value that is not a finite number or a list of numbers."""
    out = {}
    for key, value in defense.metrics().items():
        if not (isinstance(key, str) and key.isidentifier()):
            raise ValueError(f"defense {defense.name}: metric name {key!r} must be letters, digits and _")
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"defense {defense.name}: metric {key} = {value!r} must be a finite number or a list of them")
        out[f"d_{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _execute(cell: Cell, results: Path, ckpt: Path, progress: bool, keep_checkpoint: bool,
             cached: bool | None = None) -> dict[str, Any]:
    cfg, dev = cell.cfg, cell.device
    if dev.type == "cpu":
        set_threads()
    row = base_row(cfg, cell.plan, dev)
    row.update(n_skipped=cell.data.skipped, n_eval_skipped=cell.data.eval_skipped)
    t0 = time.perf_counter()
    try:
        manifest, manifest_path = json.dumps(cell.plan.manifest), manifest_file(results, cfg.run_id)
        if ckpt.is_file() and manifest_path.is_file() and manifest_path.read_text() != manifest:
            warnings.warn(f"cell {cfg.run_id}: the poisoned data differ from the checkpoint's; starting over")
            ckpt.unlink()
        atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(manifest))
        written = write_poisoned_set(cell, results)
        if written is not None:
            row["poison_files"] = str(written)
        if cell.clean_model is not None:  # the clean model the cell or its attack started from
            row["clean_model"] = clean_config(cfg).run_id
        if hasattr(cell.defense, "observe"):  # a duck-typed plugin need not have it
            cell.defense.observe(diagnostic_rows(cell))
        model, tokenizer, result = TRAIN_BY_KIND[cell.defense.kind](cell, results, ckpt, progress, row, cached)
        save_model(model, cfg.model, model_dir(results, cfg.run_id))  # kept for `bench export`
        row.update(train_s=result.train_s, data_wait_s=result.data_wait_s, augment_s=result.augment_s,
                   steps=result.steps, final_loss=result.final_loss, resumed_from_epoch=result.resumed_from_epoch)
        row.update({f"final_loss_{k}": v for k, v in result.loss_terms.items()})
        row.update(curve_columns(result.history, min(get_profile(cfg.profile).curve_n, len(cell.data.eval))))
        row.update(evaluate(model, tokenizer, cell, dev))
        row.update(defense_columns(cell.defense))
        row["status"] = "ok"
    except BaseException as e:  # Ctrl-C too: the cell is recorded as failed and retried next time
        row.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    finally:
        row.update(wall_s=time.perf_counter() - t0, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            if row["status"] == "ok" or not has_finished_row(results, cfg.run_id):
                write_row(row, results)  # a failed duplicate never replaces a finished result
        except OSError:
            if row["status"] == "ok":
                raise
    if not keep_checkpoint:
        ckpt.unlink(missing_ok=True)
        try:
            ckpt.parent.rmdir()
        except OSError:
            pass  # not empty or already gone
    return row


def diagnostic_rows(cell: Cell) -> DiagnosticRows:
    """The facts a defense may record diagnostics of (``DefenseBase.observe``) about the cell's
    training rows: classes, poisoned pairs, captions naming the attack's target label."""
    train = cell.plan.train
    target = cell.attack.target_class(cell.data, cell.plan)
    names = None
    if target is not None:
        names = torch.zeros(len(train), dtype=torch.bool)
        names[torch.as_tensor(train.captions_naming(cell.data.class_words[target]), dtype=torch.int64)] = True
        # a caption of another class that merely contains a target word ("shirt" in "t-shirt") does
        # not count: the row must be of the target class, poisoned, or of unknown class
        names &= (train.labels == target) | train.is_poison | (train.labels < 0)
    return DiagnosticRows(train.labels.clone(), train.is_poison.clone(), names)


def evaluate(model, tokenizer, cell: Cell, device: torch.device) -> dict[str, Any]:
    """Clean zero-shot top-1/top-5 on the evaluation set, the attack's metrics, the linear probe
    (``linear_probe_top1``) and retrieval recall@1/5/10 (``i2t_r1`` ... ``t2i_r10``) when the
    dataset provides their data; with the seconds each took (``zero_shot_s``, ``attack_eval_s``,
    ``probe_s``, ``retrieval_s``) and in all (``eval_s``)."""
    model.eval()
    t0 = time.perf_counter()
    ev = cell.data.eval
    size = image_size(model)
    zs = zero_shot_model(model, tokenizer, ev, device)
    # Raw features once: zero-shot normalises them, the linear probe uses them as they are.
    eval_feats = encode_images(model, eval_geometry(ev.images, size), device=device, unit=False)
    topk = zs.clean_top5 = topk_classes(eval_feats, zs.classifier, 5)
    metrics: dict[str, Any] = {
        "clean_top1": topk_accuracy(topk, ev.labels, 1),
        "clean_top5": topk_accuracy(topk, ev.labels, 5),
        "n_eval": len(ev),
    }
    lap = Laps(metrics, t0)
    lap("zero_shot_s")
    metrics.update(cell.attack.evaluate(zs, cell.data, cell.plan))
    lap("attack_eval_s")
    probe = cell.data.probe_train
    if probe is not None:
        probe_feats = encode_images(model, eval_geometry(probe.images, size), device=device, unit=False)
        metrics["linear_probe_top1"], metrics["linear_probe_c"] = linear_probe(
            probe_feats, probe.labels, eval_feats, ev.labels, seed=derive_seed(cell.cfg.seed, "linear-probe"))
        # the RoCLIP authors' probe beside it (their batch: the run's); docs/roclip-spec.md §2
        metrics["linear_probe_paper_top1"] = linear_probe_paper(
            probe_feats, probe.labels, eval_feats, ev.labels, seed=derive_seed(cell.cfg.seed, "linear-probe-paper"),
            batch_size=cell.cfg.batch_size)
        lap("probe_s")
    held = cell.data.heldout
    if held is not None:
        image_emb = encode_images(model, eval_geometry(held.images, size), device=device)
        metrics.update(retrieval_recall(image_emb, encode_texts(model, tokenizer, held.captions, device=device)))
        lap("retrieval_s")
    metrics["eval_s"] = time.perf_counter() - t0
    return metrics


class Laps:
    """Stopwatch writing the seconds since the previous lap (or since it was made) into ``out[name]``."""

    def __init__(self, out: dict[str, Any], start: float | None = None):
        self.out, self.last = out, time.perf_counter() if start is None else start

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.out[name], self.last = now - self.last, now


def base_row(cfg: RunConfig, plan: PoisonPlan, device: torch.device) -> dict[str, Any]:
    """Identity and provenance columns of a result row (docs/DESIGN.md: every number traceable)."""
    row: dict[str, Any] = {
        "run_id": cfg.run_id,
        "status": "running",
        "attack": cfg.attack,
        "defense": cfg.defense,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "profile": cfg.profile,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,  # per process
        "world_size": cfg.world_size,  # processes: the global batch is batch_size x world_size
        "n_train": len(plan.train),
        "n_poison": plan.n_poison,
        "poison_rate": plan.poison_rate,
        "asr": None,
        "manifest_hash": plan.manifest_hash(),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "config_hash": cfg.config_hash,
        "git_rev": git_rev(),
        "version": __version__,
        "device": device_name(device),
        "speed_options": str(speed_from_env()),  # bench run --speed: the numbers agree to fp tolerance
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    # one column per parameter, always prefixed by its kind (schema 2; store.read_runs renames the
    # unprefixed p_<k> columns of schema 1), so adding a plugin never renames a column. Every
    # parameter, also those a stored config leaves out at their default (config.identity).
    for kind, registry, name, params in (("attack", ATTACKS, cfg.attack, cfg.attack_params),
                                         ("defense", DEFENSES, cfg.defense, cfg.defense_params),
                                         ("dataset", DATASETS, cfg.dataset, cfg.dataset_params)):
        for k, v in dataclasses.asdict(registry.params(name, params)).items():
            row[f"p_{kind}_{k}"] = v
    return row


def device_name(device: torch.device) -> str:
    """Human-readable device, e.g. ``cpu (2 threads)`` or ``cuda:0 NVIDIA H200``."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    n = torch.get_num_threads()
    return f"{device} ({n} thread{'s' if n != 1 else ''})"
