"""The results store: one Parquet file per cell, ``<results>/runs/<run_id>.parquet``.

Each file holds one row in long format (identity, ``p_<kind>_<name>`` parameter columns, metric
columns), written atomically (temp file + rename), with the schema version in the file metadata.
Readers take the union of columns, so adding a metric never breaks reading old files: a
defense's own numbers (``d_<key>``), a data filter's detection metrics (``det_*``), ``n_kept`` /
``n_filtered`` and ``start_model`` are plain columns of the rows that have them, null elsewhere.

Schema versions: 1, parameter columns ``p_<name>`` (``p_attack_<name>``/``p_defense_<name>`` only
where an attack and a defense parameter shared a name), no dataset parameters; 2, always
``p_attack_<name>``, ``p_defense_<name>``, ``p_dataset_<name>``, and the config holds
``world_size`` when it is not 1. ``read_runs`` gives rows of schema 1 the columns of schema 2.
"""
from __future__ import annotations

import typing

import contextlib
import dataclasses
import fcntl
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .utils import atomic_write

SCHEMA_VERSION = "2"
SCHEMA_KEY = b"poisonbench.schema_version"
REQUIRED = ("run_id", "status", "attack", "defense")


def runs_dir(results: str | Path) -> Path:
    """Folder of the per-cell Parquet files under ``results``."""
    return Path(results) / "runs"


_TARGET = pa.struct([("eval_row", pa.int64()), ("true_class", pa.string()), ("adversarial_class", pa.string()),
                     ("true_index", pa.int64()), ("adversarial_index", pa.int64()),
                     ("predicted_class", pa.string()), ("predicted_index", pa.int64()), ("success", pa.bool_())])
_S, _I, _F = pa.string(), pa.int64(), pa.float64()
# Every column the engine writes, typed: each row file carries all of them (absent values as typed
# nulls), so pandas.read_parquet(runs/) and DuckDB read a store whole whichever file comes first.
ENGINE_COLUMNS = pa.schema(
    [(c, _S) for c in ("run_id", "status", "attack", "defense", "dataset", "model", "profile")]
    + [(c, _I) for c in ("seed", "epochs", "batch_size", "world_size", "n_train", "n_poison")]
    + [("poison_rate", _F), ("asr", _F)]
    + [(c, _S) for c in ("manifest_hash", "config", "config_hash", "git_rev", "version", "device", "torch", "python",
                         "error", "traceback", "poison_files", "start_model")]
    + [(c, _I) for c in ("n_skipped", "n_eval_skipped", "steps", "resumed_from_epoch", "n_eval", "asr_n", "n_kept",
                         "n_filtered", "n_finetune", "det_poisons_removed", "det_clean_removed", "det_n_poison", "det_n")]
    + [(c, _F) for c in ("train_s", "data_wait_s", "augment_s", "final_loss", "clean_top1", "clean_top5",
                         "zero_shot_s", "asr_top5", "clean_top1_nontarget", "attack_eval_s", "linear_probe_top1",
                         "linear_probe_c", "probe_s", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                         "retrieval_s", "eval_s", "start_model_train_s", "score_s", "det_auroc", "det_ap",
                         "det_tpr_at_1fpr", "det_tpr_at_5fpr", "det_fpr_at_95tpr", "wall_s")]
    + [("det_roc_fpr", pa.list_(_F)), ("det_roc_tpr", pa.list_(_F)), ("targets", pa.list_(_TARGET)),
       ("finished_at", _S)]
    # per-epoch curves and trigger survival (poisonbench.curves, poisonbench.survival)
    + [("curve_epoch", pa.list_(_I)), ("curve_clean_top1", pa.list_(_F)), ("curve_asr", pa.list_(_F)),
       ("curve_n", _I), ("trig_n", _I), ("trig_present", _F), ("trig_at_eval", _F), ("trig_corr", _F)]
)


def _arrow_type(tp: Any) -> pa.DataType:
    """The column type of a plugin parameter annotated ``tp`` (int, float, bool, str, Literal, Optional)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return _arrow_type(type(args[0]))
    if args and typing.get_origin(tp) is not typing.Literal:
        return _arrow_type(args[0])
    return {int: _I, float: _F, bool: pa.bool_()}.get(tp, _S)


def row_schema(row: dict[str, Any]) -> pa.Schema:
    """The schema a row file is written with: ENGINE_COLUMNS, the ``p_<kind>_<k>`` column of every
    parameter of every registered plugin, then the row's own other columns (a defense's ``d_*``
    numbers, a task's ``final_loss_<term>``), typed from their values."""
    from .registry import ATTACKS, DATASETS, DEFENSES

    fields = list(ENGINE_COLUMNS)
    for kind, registry in (("attack", ATTACKS), ("defense", DEFENSES), ("dataset", DATASETS)):
        for name in registry.names():
            hints = typing.get_type_hints(registry.get(name).Params)
            fields += [pa.field(f"p_{kind}_{k}", _arrow_type(t)) for k, t in hints.items()]
    seen: set[str] = set()
    fields = [f for f in fields if not (f.name in seen or seen.add(f.name))]  # one per name, the first
    extra = {k: v for k, v in row.items() if k not in seen}
    return pa.schema(fields + list(pa.Table.from_pylist([extra]).schema) if extra else fields)


def write_row(row: dict[str, Any], results: str | Path, also: pa.Schema | None = None) -> Path:
    """Write ``row`` (must have ``run_id``) to ``<results>/runs/<run_id>.parquet`` atomically,
    replacing an earlier row of the same cell, with every column of ``row_schema`` and of ``also``
    (other rows' columns, e.g. their defenses' ``d_*``; absent ones as typed nulls). Returns the path."""
    schema = row_schema(row)
    if also is not None:
        # a column this row has no value for is typed from the value (null type): take the store's type
        known = {f.name: f for f in also if not pa.types.is_null(f.type)}
        schema = pa.schema([known.get(f.name, f) if pa.types.is_null(f.type) else f for f in schema]
                           + [f for f in also if f.name not in schema.names])
    table = pa.Table.from_pylist([{k: _plain(row.get(k)) for k in schema.names}], schema=schema)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SCHEMA_KEY: SCHEMA_VERSION.encode()})
    path = runs_dir(results) / f"{row['run_id']}.parquet"
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (as read back from Parquet) as Python values pyarrow converts by schema."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return None  # NaN of a missing metric: a typed null
    return value


class CellBusyError(RuntimeError):
    """Another process is running this cell against the same store right now."""


@contextlib.contextmanager
def cell_lock(results: str | Path, run_id: str):
    """Hold an exclusive lock on cell ``run_id`` in ``results`` (``locks/<run_id>.lock``, flock).

    Two processes never train the same cell at once (their checkpoints would interleave). The
    kernel releases the lock when the holder dies, even by SIGKILL, so a stale lock file is harmless.
    Raises CellBusyError at once if another process holds it.
    """
    path = Path(results) / "locks" / f"{run_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CellBusyError(f"cell {run_id} is being run by another process on {results}") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def cache_lock(results: str | Path, run_id: str):
    """Hold the exclusive lock of the cached model of cell ``run_id`` in ``results``
    (``locks/cache-<run_id>.lock``, flock), waiting for it when another process holds it: the one
    process that trains a cached model (``runner.undefended_model``) holds it until the model is
    written, and the others then load that model instead of training it again. Released when the
    holder dies, even by SIGKILL."""
    path = Path(results) / "locks" / f"cache-{run_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_running(results: str | Path, run_id: str) -> bool:
    """True when some process holds cell ``run_id``'s lock in ``results``."""
    if not (Path(results) / "locks" / f"{run_id}.lock").is_file():
        return False
    try:
        with cell_lock(results, run_id):
            return False
    except CellBusyError:
        return True
    except OSError:
        return False


def has_finished_row(results: str | Path, run_id: str) -> bool:
    """True when the store holds a readable row with status ok for ``run_id``."""
    path = runs_dir(results) / f"{run_id}.parquet"
    try:
        return path.is_file() and pq.read_table(path, columns=["status"]).column("status")[0].as_py() == "ok"
    except (pa.ArrowException, OSError, KeyError, IndexError):
        return False


def read_row(results: str | Path, run_id: str) -> dict[str, Any]:
    """The stored row of cell ``run_id`` as a dict (FileNotFoundError when there is none)."""
    return pq.read_table(runs_dir(results) / f"{run_id}.parquet").to_pylist()[0]


def store_schema(results: str | Path) -> pa.Schema:
    """The union of the columns of every row file of ``results`` (from the file footers only;
    a column's first type other than null wins, unreadable files are left out)."""
    fields: dict[str, pa.Field] = {}
    for path in sorted(runs_dir(results).glob("*.parquet")) if runs_dir(results).is_dir() else []:
        try:
            for f in pq.read_schema(path):
                if f.name not in fields or pa.types.is_null(fields[f.name].type):
                    fields[f.name] = f
        except (pa.ArrowException, OSError):
            continue
    return pa.schema(list(fields.values()))


def rewrite_rows(results: str | Path, only_if_needed: bool = False) -> int:
    """Rewrite the row files of ``results`` so that every one has the same, full column set: the
    current ``write_row`` columns (the engine's and every registered plugin's ``p_<kind>_<k>``)
    and every column any other row has (a defense's ``d_*``, a task's ``final_loss_<term>``), as
    typed nulls where a row has no value; values unchanged, and a parameter column a row lacks
    (added since it was written) gets the value its config resolves to. Then
    ``pandas.read_parquet(runs/)`` and DuckDB's glob read the store whole. ``only_if_needed``:
    only the files that lack a column (what ``bench run`` does after a grid). Holds each cell's
    lock; skips (with a warning) files that are not readable rows and cells that are running.
    Returns the rows rewritten."""
    from .registry import ATTACKS, DATASETS, DEFENSES, RegistryError

    union = store_schema(results)
    wanted = set(row_schema({}).names) | set(union.names)
    done = 0
    for path in sorted(runs_dir(results).glob("*.parquet")):
        run_id = path.stem
        if only_if_needed:
            try:
                if wanted <= set(pq.read_schema(path).names):
                    continue
            except (pa.ArrowException, OSError):
                continue
        try:
            with cell_lock(results, run_id):
                row = read_row(results, run_id)
                config = json.loads(row.get("config") or "{}")
                for kind, registry in (("attack", ATTACKS), ("defense", DEFENSES), ("dataset", DATASETS)):
                    try:
                        params = dataclasses.asdict(registry.params(config[kind], config.get(f"{kind}_params", {})))
                    except (KeyError, RegistryError, TypeError, ValueError):
                        continue  # a plugin not installed here: its row keeps what it has
                    for k, v in params.items():
                        if row.get(f"p_{kind}_{k}") is None:
                            row[f"p_{kind}_{k}"] = v
                write_row(row, results, also=union)
                done += 1
        except (CellBusyError, pa.ArrowException, OSError, KeyError, IndexError, ValueError) as e:
            warnings.warn(f"not rewritten: {path} ({type(e).__name__}: {e})")
    return done


def read_runs(results: str | Path) -> pd.DataFrame:
    """All result rows under ``results`` as one DataFrame (empty if there are none).

    Files that are not readable Parquet (half-copied, foreign) are skipped with a warning;
    temporary files of writes in progress are ignored.
    """
    frames = []
    folder = runs_dir(results)
    if not folder.is_dir():
        return pd.DataFrame()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix != ".parquet":
            warnings.warn(f"skipping {path}: not a .parquet file")
            continue
        try:
            table = pq.read_table(path)
            frame = table.to_pandas()
        except (pa.ArrowException, OSError) as e:
            warnings.warn(f"skipping {path}: unreadable Parquet ({e})")
            continue
        missing = [c for c in REQUIRED if c not in frame.columns]
        if missing:
            warnings.warn(f"skipping {path}: not a poisonbench result (no {', '.join(missing)} column)")
            continue
        if (table.schema.metadata or {}).get(SCHEMA_KEY, b"1") == b"1":
            frame = _upgrade_v1(frame)
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)


def unrecorded_cells(results: str | Path) -> list[tuple[str, str]]:
    """(run id, what) of the cells with no row in ``results`` that are running (their lock is held)
    or resumable (an end-of-epoch checkpoint and no row): a kill -9 leaves a cell so."""
    rows = {p.stem for p in runs_dir(results).glob("*.parquet")} if runs_dir(results).is_dir() else set()
    out = {}
    ckpts = Path(results) / "checkpoints"
    for path in sorted(ckpts.glob("*/last.pt")) if ckpts.is_dir() else []:
        if path.parent.name not in rows:
            out[path.parent.name] = "resumable (checkpoint, no row yet)"
    locks = Path(results) / "locks"
    for path in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        run_id = path.stem
        if not run_id.startswith("cache-") and run_id not in rows and is_running(results, run_id):
            out[run_id] = "running"
    return sorted(out.items())


def _upgrade_v1(frame: pd.DataFrame) -> pd.DataFrame:
    """A row of schema 1 with the parameter columns of schema 2: ``p_<name>`` becomes
    ``p_<kind>_<name>`` by the kind whose parameters hold that name in the row's config, and the
    dataset parameters of the config become ``p_dataset_<name>``. Rows without a readable config
    are left as they are."""
    try:
        config = json.loads(frame["config"].iloc[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return frame
    if not isinstance(config, dict):
        return frame
    frame = frame.copy()
    for kind in ("attack", "defense", "dataset"):
        params = config.get(f"{kind}_params")
        for name, value in (params.items() if isinstance(params, dict) else ()):
            new = f"p_{kind}_{name}"
            if new not in frame:
                frame[new] = frame.pop(f"p_{name}") if kind != "dataset" and f"p_{name}" in frame else [value] * len(frame)
    return frame

