"""Image–caption pairs from files: CSV/TSV (the open_clip / RoCLIP / CleanCLIP format) and
WebDataset shards as img2dataset writes them (``.jpg``/``.png`` + ``.txt`` per sample).

Images are decoded with PIL, converted to RGB (grey, palette, RGBA, CMYK and 16-bit images
included), resized (shorter side, bicubic, antialiased) and centre-cropped to ``size``. An image
that is missing, empty, truncated or not an image is skipped and counted, never replaced by
another sample.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Pairs:
    """Decoded pairs.

    Attributes:
        images: uint8 [N, 3, size, size].
        captions: N strings, exactly as stored.
        skipped: (where, reason) of each sample left out because its image could not be read.
    """

    images: torch.Tensor
    captions: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises all three for bad data
        raise ValueError(f"not a readable image ({e})") from None
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    t = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)])
    return t(x)


def read_csv_pairs(path: str | Path, image_key: str = "filepath", caption_key: str = "title",
                   delimiter: str = "auto", size: int = 64) -> Pairs:
    """Pairs listed in a CSV/TSV file; image paths are relative to the file's folder.

    Args:
        delimiter: ``auto`` (tab for ``.tsv``, comma otherwise) or one character.
    Raises:
        FileNotFoundError: no such file. ValueError: a named column is missing (the message lists
        the file's columns).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {path}")
    sep = ("\t" if path.suffix.lower() == ".tsv" else ",") if delimiter == "auto" else delimiter
    # keep_default_na=False: a caption "NA" or "" stays a string, never becomes NaN
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = [k for k in (image_key, caption_key) if k not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; columns: {', '.join(table.columns)}")
    images, captions, skipped = [], [], []
    for rel, caption in zip(table[image_key], table[caption_key]):
        file = path.parent / rel
        try:
            images.append(decode_image(file.read_bytes(), size))
        except (OSError, ValueError) as e:
            skipped.append((str(file), str(e) if isinstance(e, ValueError) else f"cannot read ({e.strerror or e})"))
            continue
        captions.append(caption)
    return Pairs(_stack(images, size), captions, skipped)


def read_wds_pairs(urls: str, size: int = 64) -> Pairs:
    """Pairs from WebDataset shards (``urls`` brace-expanded, e.g. ``data/{00000..00009}.tar``):
    each sample's first image member (jpg, jpeg, png, webp) and its ``.txt`` caption (UTF-8).
    A sample without an image or a caption is skipped and counted.

    Raises FileNotFoundError when a shard does not exist.
    """
    import braceexpand
    import webdataset as wds

    shards = list(braceexpand.braceexpand(urls))
    for s in shards:
        if "://" not in s and not Path(s).is_file():
            raise FileNotFoundError(f"no WebDataset shard at {s}")
    images, captions, skipped = [], [], []
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        data = next((sample[k] for k in IMAGE_EXTENSIONS if k in sample), None)
        if data is None or "txt" not in sample:
            skipped.append((where, "no image" if data is None else "no .txt caption"))
            continue
        try:
            images.append(decode_image(data, size))
        except ValueError as e:
            skipped.append((where, str(e)))
            continue
        captions.append(sample["txt"].decode("utf-8"))
    return Pairs(_stack(images, size), captions, skipped)


def _stack(images: list[torch.Tensor], size: int) -> torch.Tensor:
    return torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
