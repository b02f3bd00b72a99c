"""Training images decoded when a batch asks for them, for data too large to hold in memory
(1M pairs at 224 px are 150 GB as uint8): image files of a CSV, or members of local WebDataset
shards found once by their offsets, then read with one seek each.

``LazyImages`` stands in for the uint8 tensor [N, 3, S, S] of ``CaptionDataset.images``:
indexing with an int64 tensor decodes those rows (in threads: PIL releases the GIL), ``take``
and ``cat`` make the subsets and the appended poisoned rows that attacks build, and rows an
attack assigns (label-consistent patches) are kept in memory over the source.
"""
from __future__ import annotations

import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from poisonbench.utils import usable_cores
from .images import IMAGE_EXTENSIONS, check_shard, decode_image


@dataclass(frozen=True)
class Member:
    """Where one encoded image lies: a file (offset 0, whole file) or a byte range of a tar shard."""

    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def index_shards(shards: list[str]) -> tuple[list[Member], list[str], list[tuple[str, str]]]:
    """Image members and captions of local WebDataset shards, in shard order: (members, captions,
    skipped (where, reason) for samples without an image or a ``.txt``). Reads tar headers and the
    small caption members only. Raises FileNotFoundError for a missing shard, ValueError for a
    broken one (``images.check_shard``)."""
    members, captions, skipped = [], [], []
    for shard in shards:
        check_shard(shard)
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                prefix = info.name[: len(info.name) - len(base)]
                samples.setdefault(prefix + key, {})[ext.lower()] = info
            for key, parts in samples.items():
                image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
                if image is None or "txt" not in parts:
                    skipped.append((f"{shard}:{key}", "no image" if image is None else "no .txt caption"))
                    continue
                members.append(Member(shard, image.offset_data, image.size))
                captions.append(tar.extractfile(parts["txt"]).read().decode("utf-8"))
    return members, captions, skipped


class LazyImages:
    """uint8 images [N, 3, size, size] decoded on access (see the module docstring).

    Args:
        members: where each row's encoded image lies.
        size: side in pixels (shorter side resized, centre crop, as ``images.decode_image``).
        workers: decoding threads (default: the CPUs this process may use, at most 32).
    Raises (on access): RuntimeError naming the file when an image has become unreadable since
    it was checked at load time.
    """

    dtype = torch.uint8
    ndim = 4
    lazy = True  # base.is_lazy

    def __init__(self, members: list[Member], size: int, workers: int | None = None):
        self.members = members
        self.size = size
        self.rows = torch.arange(len(members))  # row -> member index, or -1 - k for extra[k]
        self.extra = torch.empty(0, 3, size, size, dtype=torch.uint8)
        self.workers = workers or min(32, usable_cores())

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 3, self.size, self.size))

    def __len__(self) -> int:
        return len(self.rows)

    def _derive(self, rows: torch.Tensor, extra: torch.Tensor) -> "LazyImages":
        out = LazyImages.__new__(LazyImages)
        out.members, out.size, out.workers, out.rows, out.extra = self.members, self.size, self.workers, rows, extra
        return out

    def take(self, index: torch.Tensor) -> "LazyImages":
        """Rows ``index`` (int64 [M]) as a new LazyImages; nothing is decoded."""
        return self._derive(self.rows[index], self.extra)

    def cat(self, images: torch.Tensor) -> "LazyImages":
        """These rows followed by in-memory uint8 ``images`` [K, 3, size, size]."""
        if tuple(images.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"appended images are {tuple(images.shape[1:])}, expected (3, {self.size}, {self.size})")
        new = -1 - (len(self.extra) + torch.arange(len(images)))
        return self._derive(torch.cat([self.rows, new]), torch.cat([self.extra, images]))

    def __setitem__(self, index, values: torch.Tensor) -> None:
        """Replace rows ``index`` by in-memory uint8 ``values`` [M, 3, size, size] (this object only)."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        values = values.reshape(len(index), 3, self.size, self.size)
        self.rows = self.rows.clone()
        self.rows[index] = -1 - (len(self.extra) + torch.arange(len(index)))
        self.extra = torch.cat([self.extra, values])

    def __getitem__(self, index) -> torch.Tensor:
        """Decoded rows: uint8 [3, size, size] for an int, [M, 3, size, size] for an int64 tensor,
        list or slice."""
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        rows = self.rows[torch.as_tensor(index, dtype=torch.int64)].tolist()
        out = torch.empty(len(rows), 3, self.size, self.size, dtype=torch.uint8)

        def fill(i: int) -> None:
            r = rows[i]
            out[i] = self.extra[-1 - r] if r < 0 else self._decode(r)

        if self.workers == 1:  # in a decoding worker process (``train.prefetched``)
            for i in range(len(rows)):
                fill(i)
            return out
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(fill, range(len(rows))))
        return out

    def _decode(self, member: int) -> torch.Tensor:
        m = self.members[member]
        try:
            return decode_image(m.read(), self.size)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"training image {m.path}" + (f" @{m.offset}" if m.size >= 0 else "")
                               + f" cannot be read any more ({e}); it was readable when the run started") from None

    def check(self) -> list[tuple[str, str]]:
        """Decode every source image once; (where, reason) of those that cannot be read."""

        def bad(m: Member) -> tuple[str, str] | None:
            try:
                decode_image(m.read(), self.size)
                return None
            except (OSError, ValueError) as e:
                return (m.path + (f"@{m.offset}" if m.size >= 0 else ""), str(e))

        with ThreadPoolExecutor(self.workers) as pool:
            return [b for b in pool.map(bad, self.members) if b is not None]
