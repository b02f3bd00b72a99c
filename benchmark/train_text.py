"""The text side of training: the captions a defense trains on and their tokens.

The captions a defense trains on (its ``text_transform``, e.g. one EDA rewrite per caption) are
computed once per (captions, transform key) and kept on disk for large training sets.

EDA over a million captions takes minutes (the official code's, ~5 min per 1M); without a cache
every cell of the defense and every rank of a cell would compute it again. A defense opts in by
returning the key of its transform from ``text_transform_key`` (aug-only and RoCLIP: EDA's seed
and alpha, so they share one file). The cache
lives in ``$POISONBENCH_CACHE`` (default ``$XDG_CACHE_HOME/poisonbench``, else
``~/.cache/poisonbench``) under ``captions/``, one Parquet file per key, written atomically; the
first process to need a key computes it under a file lock, the others wait and read it.

Their tokens (``CaptionTokens``) are made once up front for data held in memory (as always) and
batch by batch, in the decoding workers, for lazily loaded data: host memory per rank then does
not grow with the dataset (CC3M's 3M captions are 1.9 GB of int64 tokens).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import warnings
from pathlib import Path

import torch

from . import __version__
from .utils import atomic_write, hash_json

CACHE_ABOVE = 100_000  # training sets with fewer captions compute the transform (seconds) every time
FORMAT = 1  # bumped when a transform's output changes for the same key


def cache_root() -> Path:
    """The folder of poisonbench's machine-local caches (see the module docstring)."""
    if os.environ.get("POISONBENCH_CACHE"):
        return Path(os.environ["POISONBENCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "poisonbench"


def captions_digest(captions: list[str]) -> str:
    """SHA-256 of the captions in order (each UTF-8, NUL-terminated)."""
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def transformed_captions(defense, captions: list[str]) -> list[str]:
    """``defense.text_transform(captions)``: from the cache when the defense gives a key
    (``text_transform_key``) and there are at least ``CACHE_ABOVE`` captions, else computed.
    A cache file that cannot be read, or holds another number of captions, is computed again
    and replaced. Raises what ``text_transform`` raises."""
    key = getattr(defense, "text_transform_key", lambda: None)()
    if key is None or len(captions) < CACHE_ABOVE:
        return defense.text_transform(captions)
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = hash_json({"key": key, "format": FORMAT, "version": __version__, "captions": captions_digest(captions)})[:32]
    path = cache_root() / "captions" / f"{name}.parquet"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only or full cache folder: compute, as without a cache
        warnings.warn(f"caption cache {path.parent} cannot be used ({e}); computing the captions without it "
                      "(set POISONBENCH_CACHE to a writable folder to keep them)")
        return defense.text_transform(captions)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one process computes; the others wait, then read
        try:
            out = pq.read_table(path).column("caption").to_pylist()
            if len(out) == len(captions) and all(isinstance(c, str) for c in out):
                return out
        except (OSError, KeyError, pa.ArrowException):
            pass
        out = defense.text_transform(captions)
        try:
            atomic_write(path, lambda tmp: pq.write_table(pa.table({"caption": out}), tmp))
        except OSError as e:
            warnings.warn(f"caption cache {path.parent}: could not keep the captions ({e})")
        return out
    finally:
        os.close(fd)


class CaptionTokens:
    """Token ids of N captions, int64 [N, L] when indexed with int64 rows [B] (-> [B, L]).

    ``eager``: tokenize every caption now and index the tensor (data in memory: as fast as it
    gets); else keep the captions and tokenize the rows asked for (the same ids: open_clip's
    tokenizers are deterministic per caption)."""

    def __init__(self, captions: list[str], tokenizer, eager: bool):
        self.captions, self.tokenizer = captions, tokenizer
        self.tensor = tokenizer(captions) if eager else None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[rows]
        return self.tokenizer([self.captions[i] for i in torch.as_tensor(rows).reshape(-1).tolist()])
