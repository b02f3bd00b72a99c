"""Small helpers shared across the engine: stable seeds, hashing, atomic file writes."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from ``parts`` (stable across processes, unlike ``hash()``)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def hash_json(obj: Any) -> str:
    """SHA-256 hex digest of ``obj``'s canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write ``path`` all-or-nothing: ``write(tmp_path)`` fills a temp file in the same folder,
    which is then fsynced and renamed over ``path``. On any error the temp file is removed and
    ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files that ``atomic_write(path, ...)`` calls killed mid-write (SIGKILL,
    power loss) left beside ``path`` (``.<name>.*.tmp``; a write that fails otherwise removes its
    own). Readers never look at them, but they can be as large as a checkpoint. Call it only when
    no other process may be writing ``path`` right now, e.g. while holding the cell's lock.
    Returns the paths removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.glob(glob.escape(f".{path.name}.") + "*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


WORKERS_ENV = "POISONBENCH_WORKERS"  # set by `bench run --workers`; read by every cell it starts


def decode_workers(cuda: bool) -> int:
    """Worker processes that decode lazily loaded training images (``train.prefetched``):
    ``POISONBENCH_WORKERS`` when set (``bench run --workers``), else the cores allotted to the
    cell (OMP_NUM_THREADS, which ``bench run --jobs`` sets per cell, else ``usable_cores``) minus
    one for the training process, at most 8 per GPU (open_clip's default). 0 decodes in a thread
    of the training process.

    Raises ValueError when the variable is not a whole number >= 0."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"{WORKERS_ENV}={value!r}: give the number of decoding worker processes (0 or more)")
        return int(value)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    cores = int(threads) if threads.isdigit() and int(threads) > 0 else usable_cores()
    return min(8, cores - 1) if cuda else cores - 1
