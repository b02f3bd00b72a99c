"""Fashion-MNIST (Xiao et al. 2017) as an image–caption dataset: the embedded default.

Real 28x28 grey images from the IDX files of the Debian package ``dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist), of torchvision's ``FashionMNIST(root, download=True)`` layout,
or of the folder in ``$POISONBENCH_DATA``. Each training image gets one caption written from a
varied template set and class synonyms (seeded); the official 10k test split is the evaluation set.
"""
from __future__ import annotations

import gzip
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from poisonbench.registry import param, register_dataset
from poisonbench.utils import derive_seed

from .base import CaptionDataset, DatasetBundle, EvalSet, draw_rows, with_article
from .fashion_captions import STYLES, attribute_caption, describe, measure, reference_cuts, web_caption

CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]

# Words a caption may use for each class; the first is the class name.
CLASS_WORDS = [
    ["t-shirt", "tee", "tee shirt", "short-sleeved top"],
    ["trouser", "pair of trousers", "pair of pants", "pair of slacks"],
    ["pullover", "sweater", "jumper", "knit sweater"],
    ["dress", "gown", "frock", "summer dress"],
    ["coat", "jacket", "overcoat", "parka"],
    ["sandal", "pair of sandals", "strappy sandal", "flip-flop"],
    ["shirt", "button-up shirt", "blouse", "collared shirt"],
    ["sneaker", "trainer", "running shoe", "sports shoe"],
    ["bag", "handbag", "purse", "tote bag"],
    ["ankle boot", "boot", "bootie", "short boot"],
]

# Each ``{}`` takes a noun phrase with its article ("an overcoat", "a dark pair of trousers").
CAPTION_TEMPLATES = [
    "a photo of {}.",
    "a grayscale product photo of {}",
    "{} on a black background",
    "a small picture of {}.",
    "this is {}",
    "{} for sale in an online shop",
    "an image showing {}",
    "catalog photo: {}",
    "just bought {}",
    "a close-up of {}.",
    "a low resolution image of {}",
    "{} from the fashion catalogue",
    "a black and white picture of {}",
    "product shot of {}, centered",
]

ADJECTIVES = ["", "", "", "stylish ", "cheap ", "new ", "classic ", "simple ", "dark ", "light "]

ZERO_SHOT_TEMPLATES = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a picture of the {}.",
    "an image of a {}.",
    "a product photo of a {}.",
    "a photo of the small {}.",
    "a centered photo of a {}.",
]

SPLITS = {"train": "train", "test": "t10k"}
WEB_SHARES = (0.3, 0.1)  # the web captions' default shares naming no class / a related class
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"


class DataNotFoundError(FileNotFoundError):
    """The Fashion-MNIST IDX files are not in any of the places searched."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), plain or gzipped.

    Returns a numpy array of the dtype and shape the header declares (uint8 [N, 28, 28] for
    Fashion-MNIST images, uint8 [N] for labels). Raises ValueError for a corrupt gzip stream,
    a bad magic number, an unknown type code, or a payload whose size does not match the header.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # truncated or corrupt gzip stream
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: payload is {len(data) - header} bytes, header {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_root() -> Path:
    """The folder holding the Fashion-MNIST IDX files.

    Searched in order: ``$POISONBENCH_DATA`` (itself, ``fashion-mnist/``, or torchvision's
    ``FashionMNIST/raw/`` under it), then the Debian package path. Raises DataNotFoundError
    saying how to get the data.
    """
    env = os.environ.get("POISONBENCH_DATA")
    if env:
        base = Path(env)
        candidates = [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
        for c in candidates:
            if _split_file(c, "train", "images") is not None:
                return c
        raise DataNotFoundError(
            f"POISONBENCH_DATA={env} holds no Fashion-MNIST IDX files (looked in: "
            + ", ".join(map(str, candidates)) + "); fix or unset it (the default is " + DEBIAN_ROOT + ")."
        )
    candidates = [Path(DEBIAN_ROOT)]
    for c in candidates:
        if _split_file(c, "train", "images") is not None:
            return c
    raise DataNotFoundError(
        "Fashion-MNIST not found (looked in: " + ", ".join(map(str, candidates)) + "). Install it with "
        "`sudo apt-get install dataset-fashion-mnist`, or set POISONBENCH_DATA to a folder holding "
        "train-images-idx3-ubyte[.gz] and the other three IDX files (torchvision's "
        "FashionMNIST(root, download=True) layout under POISONBENCH_DATA also works)."
    )


def _split_file(root: Path, split: str, kind: str) -> Path | None:
    stem = f"{SPLITS[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, 28, 28] (grey repeated to RGB) and labels int64 [N] of ``split``."""
    paths = {k: _split_file(root, split, k) for k in ("images", "labels")}
    missing = [k for k, p in paths.items() if p is None]
    if missing:
        raise DataNotFoundError(f"{root}: the {split} {' and '.join(missing)} IDX file is missing")
    images = read_idx(paths["images"])
    labels = read_idx(paths["labels"])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.max() >= len(CLASSNAMES):
        raise ValueError(f"{root}: {split} labels go up to {labels.max()}, Fashion-MNIST has 10 classes")
    imgs = torch.from_numpy(images.copy()).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return imgs, torch.from_numpy(labels.astype(np.int64))


def write_caption(label: int, rng: random.Random) -> str:
    """One caption for class ``label``: a random template, adjective and class word from ``rng``,
    with the indefinite article the phrase needs ("an overcoat", "a new ankle boot")."""
    word = rng.choice(CLASS_WORDS[label])
    return rng.choice(CAPTION_TEMPLATES).format(with_article(rng.choice(ADJECTIVES) + word))


@dataclass
class FashionMNISTParams:
    n_train: int = param(0, "training pairs drawn (seeded) from the 60k train split; 0 = all")
    n_eval: int = param(0, "evaluation images drawn (seeded) from the 10k test split; 0 = all")
    n_probe: int = param(10000, "train-split images for the linear probe (seeded); 0 = all 60k")
    n_heldout: int = param(1000, "test-split images with generated captions for retrieval recall@k")
    # Added after release: hash_default=False keeps the run ids of every cell at the default.
    n_finetune: int = param(-1, "clean fine-tuning pairs for post-training repairs, drawn (seeded) from the train-split "
                                "images that are not training pairs; -1 = 10 % of n_train, at least 128; 0 = none",
                            hash_default=False)
    captions: Literal["templates", "attributes", "web"] = param(
        "templates", "caption style: templates (a template around the class word), attributes (the class word and "
                     "what the pixels show: brightness, extent, aspect, texture, position), web (attributes, and "
                     "some captions name no class or a related one, as alt-text)", hash_default=False)
    web_unnamed: float = param(WEB_SHARES[0], "web captions: share that names no class, in [0, 1]", hash_default=False)
    web_related: float = param(WEB_SHARES[1], "web captions: share that names a related class instead, in [0, 1]",
                               hash_default=False)


@register_dataset("fashion-mnist")
class FashionMNIST:
    """Fashion-MNIST with generated captions (60k train / 10k test, 10 classes, 28x28 grey)."""

    Params = FashionMNISTParams

    def __init__(self, params: FashionMNISTParams):
        for name in ("n_train", "n_eval", "n_probe", "n_heldout"):
            if getattr(params, name) < 0:
                raise ValueError(f"fashion-mnist: {name} must be >= 0 (0 = all), got {getattr(params, name)}")
        if params.n_finetune < -1:
            raise ValueError(f"fashion-mnist: n_finetune must be >= 0, or -1 for 10 % of n_train, got {params.n_finetune}")
        if params.captions not in STYLES:
            raise ValueError(f"fashion-mnist: unknown caption style {params.captions!r}; valid: {', '.join(STYLES)}")
        shares = (params.web_unnamed, params.web_related)
        if not (all(0.0 <= v <= 1.0 for v in shares) and sum(shares) <= 1.0):
            raise ValueError(f"fashion-mnist: web_unnamed and web_related must be in [0, 1] with a sum <= 1, got "
                             f"{params.web_unnamed} and {params.web_related}")
        if params.captions != "web" and shares != WEB_SHARES:
            raise ValueError(f"fashion-mnist: web_unnamed and web_related apply to captions=web only, not "
                             f"captions={params.captions}; drop them or set captions=web")
        self.params = params
        self.cuts = None  # the attribute styles' terciles over the train split, measured once

    def caption(self, images: torch.Tensor, labels: torch.Tensor, rng: random.Random, split: torch.Tensor) -> list[str]:
        """One caption per image (uint8 [N, 3, 28, 28], classes int64 [N]) in the ``captions``
        style, drawn from ``rng``; ``split`` is the whole train split (its terciles cut the
        attribute words)."""
        p = self.params
        if p.captions == "templates":
            return [write_caption(int(y), rng) for y in labels]
        if self.cuts is None:
            self.cuts = reference_cuts(split)
        out = []
        for y, attrs in zip(labels.tolist(), describe(measure(images), self.cuts)):
            word = rng.choice(CLASS_WORDS[y])
            out.append(attribute_caption(word, attrs, rng) if p.captions == "attributes" else
                       web_caption(word, CLASSNAMES[y], attrs, rng, p.web_unnamed, p.web_related))
        return out

    def load(self, seed: int) -> DatasetBundle:
        """Read the IDX files and caption the training images, seeded by ``seed``."""
        root = find_root()
        train_x, train_y = load_split(root, "train")
        test_x, test_y = load_split(root, "test")
        g = torch.Generator().manual_seed(seed)
        train_idx = draw_rows(len(train_y), self.params.n_train, g, "fashion-mnist: n_train")
        eval_idx = draw_rows(len(test_y), self.params.n_eval, g, "fashion-mnist: n_eval")
        rng = random.Random(seed)
        labels = train_y[train_idx]
        captions = self.caption(train_x[train_idx], labels, rng, train_x)
        train = CaptionDataset(train_x[train_idx], captions, labels)
        ev = EvalSet(test_x[eval_idx], test_y[eval_idx], list(CLASSNAMES), list(ZERO_SHOT_TEMPLATES))
        probe_idx = draw_rows(len(train_y), self.params.n_probe, g, "fashion-mnist: n_probe")
        probe = EvalSet(train_x[probe_idx], train_y[probe_idx], list(CLASSNAMES), list(ZERO_SHOT_TEMPLATES))
        held_idx = draw_rows(len(test_y), self.params.n_heldout, g, "fashion-mnist: n_heldout") if self.params.n_heldout else None
        heldout = None
        if held_idx is not None:
            held_rng = random.Random(seed + 1)  # captions independent of the training captions
            held_caps = self.caption(test_x[held_idx], test_y[held_idx], held_rng, train_x)
            heldout = CaptionDataset(test_x[held_idx], held_caps, test_y[held_idx])
        finetune = None
        ft_idx = finetune_rows(len(train_y), train_idx, self.params.n_finetune, seed)
        if len(ft_idx):
            ft_rng = random.Random(derive_seed(seed, "finetune-captions"))
            ft_caps = self.caption(train_x[ft_idx], train_y[ft_idx], ft_rng, train_x)
            finetune = CaptionDataset(train_x[ft_idx], ft_caps, train_y[ft_idx])
        return DatasetBundle(train, ev, [list(w) for w in CLASS_WORDS], list(CAPTION_TEMPLATES), probe, heldout,
                             finetune=finetune)


def finetune_rows(n_split: int, train_idx: torch.Tensor, n_finetune: int, seed: int) -> torch.Tensor:
    """Sorted rows, int64 [k], of the clean fine-tuning split: train-split rows (of ``n_split``)
    that are not training rows (``train_idx``), drawn without replacement by a generator of their
    own (seeded from ``seed``), so the other draws of ``load`` are those they were before the
    split existed. The evaluation set and the retrieval hold-out come from the test split, so the
    split is disjoint from them too. ``n_finetune`` -1 means 10 % of the training pairs, at least
    128, as many as are left (none when the training pairs take the whole split); 0 means none.
    Raises ValueError when an explicit ``n_finetune`` exceeds the rows left."""
    free = torch.ones(n_split, dtype=torch.bool)
    free[train_idx] = False
    rest = free.nonzero().squeeze(1)
    k = min(max(128, len(train_idx) // 10), len(rest)) if n_finetune == -1 else n_finetune
    if k > len(rest):
        raise ValueError(f"fashion-mnist: n_finetune={k} exceeds the {len(rest)} train-split images that are not "
                         "training pairs; lower n_finetune or n_train")
    g = torch.Generator().manual_seed(derive_seed(seed, "finetune"))
    return rest[torch.randperm(len(rest), generator=g)[:k]].sort().values
