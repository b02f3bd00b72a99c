"""``bench perf``'s data stage: how fast lazily loaded training images are decoded on this machine.

A synthetic JPEG set at the paper profile's image size (320 x 256 for its 224 px, as the JPEGs of
the H200 measurement, so that the resize and the crop both happen) is written to a temporary folder as a
CSV of files and as WebDataset shards; each is loaded as ``bench run --data`` loads it with
``load=lazy`` and its batches are fetched by the trainer's own ``train.prefetched`` with a thread
of the process (``--workers 0``) or 1, 2, ... worker processes. The rate a GPU needs is set
beside it: the H200's RN50 training rate from memory (``H200_RN50_SAMPLES_PER_S``).
"""
from __future__ import annotations

import contextlib
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# RN50 CLIP trained from memory on one H200 (batch 256, bf16): docs/measurements/
# paper_throughput_h200_2026-11-29.csv, clip, samples_s_clip_epoch
H200_RN50_SAMPLES_PER_S = 1207.0
BATCH = 128  # images per fetched batch


def paper_image_size() -> int:
    """The side, in pixels, the paper profile decodes training images to (its model's input)."""
    import open_clip

    from .config import get_profile

    return int(open_clip.get_model_config(get_profile("paper").model)["vision_cfg"]["image_size"])


def write_jpeg_set(folder: Path, n: int, size: int, seed: int = 0) -> dict[str, str]:
    """Write ``n`` synthetic JPEG photos (smooth random colour fields with fine noise, quality 90,
    shorter side 256/224 x ``size``, aspect 5:4: 320 x 256 for 224) with captions to ``folder``: as
    files listed in ``train.csv`` and as two WebDataset shards. Returns the ``--data`` specs
    {"csv": ..., "wds": ...}."""
    rng = np.random.default_rng(seed)
    h = size * 256 // 224
    w = h * 5 // 4
    (folder / "img").mkdir(parents=True, exist_ok=True)
    encoded = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
        (folder / "img" / f"{i}.jpg").write_bytes(encoded[-1])
    captions = [f"a photo of thing number {i}" for i in range(n)]
    lines = ["filepath,title"] + [f"img/{i}.jpg,{c}" for i, c in enumerate(captions)]
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    half = n // 2
    for shard, rows in enumerate((range(half), range(half, n))):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for i in rows:
                for ext, data in (("jpg", encoded[i]), ("txt", captions[i].encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"csv": f"csv:{folder / 'train.csv'}", "wds": "wds:" + str(folder / "shard-{00000..00001}.tar")}


def decode_rate(images, workers: int) -> float:
    """Images/s of fetching every row of the lazily loaded ``images`` once, in batches of BATCH in a
    fixed shuffled order, through ``train.prefetched`` with ``workers`` processes (0: a thread):
    the steady rate, from the first batch received to the last, so that starting the workers
    (once an epoch: nothing against an epoch of a million pairs) is not counted."""
    from .train import batch_rows, prefetched

    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    steps = len(images) // BATCH
    if steps < 2:
        raise ValueError(f"{len(images)} images make fewer than 2 batches of {BATCH}")
    t_first = None
    for _batch in prefetched(images, batch_rows(order, steps, BATCH), background=True, workers=workers):
        t_first = t_first or time.perf_counter()
    return (steps - 1) * BATCH / (time.perf_counter() - t_first)


def worker_counts(cores: int) -> list[int]:
    """The numbers of worker processes measured: 0 (a thread), then 1, 2, 4, ... up to the cores (at most 8)."""
    counts, w = [0, 1], 2
    while w <= min(cores, 8):
        counts.append(w)
        w *= 2
    if min(cores, 8) not in counts:
        counts.append(min(cores, 8))
    return counts


@contextlib.contextmanager
def decode_variants(n_images: int):
    """Within the context: ``(variants, size)``, where ``variants`` maps ``"csv, 2 workers"`` (and
    the like, for the CSV and WebDataset sources and each of ``worker_counts``) to a function
    returning {"images_per_s": ...} over ``n_images`` synthetic JPEGs at the paper profile's image
    ``size``, written to a temporary folder that is removed on exit."""
    from .datasets.files import read_pairs
    from .utils import usable_cores

    size = paper_image_size()
    with tempfile.TemporaryDirectory(prefix="poisonbench-perf-") as tmp:
        specs = write_jpeg_set(Path(tmp), n_images, size)
        variants = {}
        for source, spec in specs.items():
            images = read_pairs(spec, size, load="lazy").images
            for w in worker_counts(usable_cores()):
                name = f"{source}, {w} worker{'s' if w != 1 else ''}" if w else f"{source}, threads"
                variants[name] = lambda images=images, w=w: {"images_per_s": decode_rate(images, w)}
        yield variants, size
