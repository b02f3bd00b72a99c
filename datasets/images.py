"""Image decoding and WebDataset shard checks shared by the file-backed datasets (``files``,
``evalsets``, ``lazy``): a leaf module, importing nothing else of the package but
``poisonbench.preprocess``.

Images are decoded with PIL, converted to RGB (grey, palette, RGBA, CMYK and 16-bit images
included), resized (shorter side, bicubic, antialiased) and centre-cropped to ``size``. Reading a
file and decoding it raise only ``UNREADABLE`` errors for an image that cannot be used; callers
skip that sample and count it (``(where, reason)`` pairs, ``reason`` from ``unreadable_reason``),
never replacing it by another sample.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from poisonbench.preprocess import eval_geometry

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# What reading an image file (OSError) and ``decode_image`` (ValueError) raise for an image that
# cannot be used: catch these to skip and count it.
UNREADABLE = (OSError, ValueError)


def unreadable_reason(e: Exception) -> str:
    """The reason recorded for a skipped image, from one of the ``UNREADABLE`` errors:
    ``decode_image``'s message, or ``cannot read (...)`` for a file that could not be read."""
    return str(e) if isinstance(e, ValueError) else f"cannot read ({getattr(e, 'strerror', None) or e})"


def check_skip_rate(source: str, skipped: list[tuple[str, str]], total: int, max_skip_rate: float,
                    images: str = "images") -> None:
    """ValueError when more than ``max_skip_rate`` (a fraction in [0, 1)) of the ``total`` images
    of ``source`` were skipped as unreadable (``skipped``: (where, reason) pairs), naming the first
    three: the one threshold of the file-backed datasets (``files``' ``max_skip_rate``), for
    training, fine-tuning, evaluation and linear-probe images alike. ``images`` names them in the
    message ("evaluation images")."""
    rate = len(skipped) / total if total else 0.0
    if rate > max_skip_rate:
        first = "; ".join(f"{w}: {r}" for w, r in skipped[:3])
        raise ValueError(f"{source}: {len(skipped)} of {total} {images} ({rate:.1%}) cannot be read, above "
                         f"max_skip_rate={max_skip_rate:g} (first: {first}); fix the data or raise max_skip_rate")


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """uint8 [3, size, size] from encoded image bytes; ValueError when they are not a readable image."""
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                arr = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode.startswith("I;16") else max(1.0, float(arr.max()))
                img = Image.fromarray((arr / peak * 255.0).round().clip(0, 255).astype(np.uint8), "L")
            rgb = img.convert("RGB")  # L, P, RGBA (alpha dropped), CMYK, ...
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for bad data
        raise ValueError(f"not a readable image ({str(e).replace(repr(io.BytesIO), 'data')})") from None
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return eval_geometry(x.unsqueeze(0), size)[0]


def check_shard(path: str) -> None:
    """Read the tar headers of local shard ``path``. Raises FileNotFoundError when it is not
    there, ValueError naming it when it is not a complete tar file (a partial download, another
    format), since a broken shard would otherwise stop training half-way."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no WebDataset shard at {path}")
    size = Path(path).stat().st_size
    try:
        with tarfile.open(path) as tar:
            end = 0
            for m in tar:
                end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if end > size:
                    raise tarfile.TarError(f"member {m.name} runs past the end of the file")
        with open(path, "rb") as f:  # a tar ends with two zero blocks: without them, it was cut short
            f.seek(end)
            if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                raise tarfile.TarError("no end-of-archive marker after the last member")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"WebDataset shard {path} is not a complete tar file ({e}); download it again, or leave it "
                         "out of the brace range") from None
