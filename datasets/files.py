"""Image–caption pairs from files: CSV/TSV (the open_clip / RoCLIP / CleanCLIP format) and
WebDataset shards as img2dataset writes them (``.jpg``/``.png`` + ``.txt`` per sample).

Images are decoded by ``images.decode_image`` (RGB, shorter side resized, centre crop to
``size``). An image that is missing, empty, truncated or not an image is skipped and counted,
never replaced by another sample.

pandas, braceexpand and webdataset are imported inside the functions that use them: they are
heavy, and only runs on files need them.
"""
from __future__ import annotations

import io
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from poisonbench.registry import param, register_dataset

from .base import CaptionDataset, DatasetBundle
from .evalsets import load_eval
from .fashion_mnist import CLASS_WORDS
from .images import (IMAGE_EXTENSIONS, UNREADABLE, check_shard, check_skip_rate, decode_image,  # noqa: F401 (re-exported)
                     unreadable_reason)
from .lazy import LazyImages, Member, index_shards


@dataclass
class Pairs:
    """Decoded pairs.

    Attributes:
        images: uint8 [N, 3, size, size], or a ``lazy.LazyImages`` standing in for it.
        captions: N strings, exactly as stored.
        skipped: (where, reason) of each sample left out because its image could not be read.
    """

    images: torch.Tensor
    captions: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_csv_pairs(path: str | Path, image_key: str = "filepath", caption_key: str = "title",
                   delimiter: str = "auto", size: int = 64) -> Pairs:
    """Pairs listed in a CSV/TSV file; image paths are relative to the file's folder.

    Args:
        delimiter: ``auto`` (``sniff_delimiter``: tab for a ``.tsv`` or a tab-separated header,
            comma otherwise) or tab, comma, semicolon, pipe.
    Raises:
        FileNotFoundError: no such file. ValueError: a named column is missing (the message lists
        the file's columns).
    """
    path = Path(path)
    table = read_csv_table(path, image_key, caption_key, delimiter)
    images, captions, skipped = [], [], []
    for rel, caption in zip(table[image_key], table[caption_key]):
        file = path.parent / rel
        try:
            images.append(decode_image(file.read_bytes(), size))
        except UNREADABLE as e:
            skipped.append((str(file), unreadable_reason(e)))
            continue
        captions.append(caption)
    return Pairs(_stack(images, size), captions, skipped)


DELIMITERS = {"tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


def sniff_delimiter(path: Path, image_key: str) -> str:
    """The separator of a CSV/TSV file from its header line: a tab when the header split at tabs
    has the column ``image_key`` (open_clip's trainer writes a tab-separated ``train.csv`` with
    columns filepath and title) or the file is a ``.tsv``, else a comma."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n")
    if path.suffix.lower() == ".tsv" or ("\t" in header and image_key in header.split("\t")):
        return "\t"
    return ","


def check_delimiter(delimiter: str) -> None:
    """ValueError unless ``delimiter`` is ``auto`` or a name of DELIMITERS."""
    if delimiter != "auto" and delimiter not in DELIMITERS:
        raise ValueError(f"files: delimiter {delimiter!r} is not one of auto, {', '.join(DELIMITERS)} "
                         "(names, since a tab or a comma cannot be written on the command line)")


def read_csv_table(path: Path, image_key: str, caption_key: str, delimiter: str = "auto"):
    """The CSV/TSV as a pandas DataFrame of strings (a caption "NA" or "" stays a string).
    ``delimiter``: ``auto`` (``sniff_delimiter``) or a name of DELIMITERS.
    Raises FileNotFoundError or ValueError (an unknown delimiter; a named column is missing: the
    message lists the columns)."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"no CSV file at {path}")
    check_delimiter(delimiter)
    sep = sniff_delimiter(path, image_key) if delimiter == "auto" else DELIMITERS[delimiter]
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = [k for k in (image_key, caption_key) if k not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; columns: {', '.join(table.columns)}")
    return table


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
        if "://" not in s:
            check_shard(s)
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


def read_pairs(spec: str, size: int, image_key: str = "filepath", caption_key: str = "title",
               delimiter: str = "auto", load: str = "memory") -> Pairs:
    """Pairs from ``csv:PATH`` (``read_csv_pairs``) or ``wds:URLS`` (``read_wds_pairs``), decoded
    into memory, or with ``load="lazy"`` as a ``lazy.LazyImages`` (every image decoded once here
    to find the unreadable ones); ``auto`` is lazy when the decoded images would pass
    ``LAZY_ABOVE_BYTES``.

    Raises ValueError for another prefix, FileNotFoundError for a missing file or shard."""
    kind, _, where = spec.partition(":")
    if kind not in ("csv", "wds") or not where:
        raise ValueError(f"training data {spec!r}: give csv:PATH (a CSV/TSV of image paths and captions) "
                         "or wds:URLS (WebDataset shards, e.g. wds:data/{00000..00009}.tar)")
    if kind == "csv":
        table = read_csv_table(Path(where).expanduser(), image_key, caption_key, delimiter)
        members = [Member(str(Path(where).expanduser().parent / rel)) for rel in table[image_key]]
        captions, skipped = list(table[caption_key]), []
    else:
        import braceexpand

        shards = list(braceexpand.braceexpand(where))
        if load == "memory" or any("://" in s or s.startswith("pipe:") for s in shards):
            return read_wds_pairs(where, size)
        members, captions, skipped = index_shards(shards)
    lazy = load == "lazy" or (load == "auto" and len(members) * 3 * size * size > LAZY_ABOVE_BYTES)
    if not lazy:  # decode the listed members now; the CSV or the shard headers are not read again
        images, kept, bad = [], [], []
        for m, caption in zip(members, captions):
            try:
                images.append(decode_image(m.read(), size))
                kept.append(caption)
            except UNREADABLE as e:
                bad.append((_where(m), unreadable_reason(e)))
        return Pairs(_stack(images, size), kept, skipped + bad)
    images = LazyImages(members, size)
    bad = dict(images.check())
    keep = [i for i, m in enumerate(members) if _where(m) not in bad]
    images = LazyImages([members[i] for i in keep], size)
    return Pairs(images, [captions[i] for i in keep], skipped + list(bad.items()))


LAZY_ABOVE_BYTES = 8 * 2**30  # decoded training images above this are loaded lazily by load=auto


def _where(m) -> str:
    return m.path + (f"@{m.offset}" if m.size >= 0 else "")


def label_by_caption(captions: list[str], class_words: list[list[str]]) -> torch.Tensor:
    """The class each caption names, int64 [N]: the class whose words (whole words, any case)
    occur in it when exactly one class's do, -1 when none or several do (a word of several
    classes, e.g. ImageNet's two "sunglasses", names several). Attacks use these labels to pick
    poison sources outside (or inside) the target class."""
    word_classes: dict[str, set[int]] = {}
    for c, words in enumerate(class_words):
        for w in words:
            word_classes.setdefault(w.lower(), set()).add(c)
    # longest first, so that "ankle boot" wins over "boot" at the same position
    alternatives = sorted(word_classes, key=len, reverse=True)
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in alternatives) + r")\b", re.IGNORECASE)
    labels = []
    for caption in captions:
        found = set().union(*(word_classes[m.group(0).lower()] for m in pattern.finditer(caption)))
        labels.append(found.pop() if len(found) == 1 else -1)
    return torch.tensor(labels, dtype=torch.int64)


@dataclass
class FilesParams:
    train: str = param("", "training pairs: csv:PATH (CSV/TSV; image paths relative to it) or wds:URLS (WebDataset shards)")
    eval: str = param("fashion-mnist", "evaluation set: fashion-mnist, imagenet:ROOT, cifar10:ROOT, cifar100:ROOT or imagefolder:ROOT")
    image_key: str = param("filepath", "CSV column of image paths")
    caption_key: str = param("title", "CSV column of captions")
    delimiter: str = param("auto", "CSV delimiter: auto (tab for a .tsv or a tab-separated header, as open_clip's "
                                   "train.csv; comma otherwise), tab, comma, semicolon or pipe")
    image_size: int = param(0, "side, in pixels, images are decoded to (shorter side resized, centre crop); 0 = the model's input size")
    max_skip_rate: float = param(0.01, "fail when more than this fraction of the training images (or of the "
                                       "evaluation, linear-probe or fine-tuning images) cannot be read")
    n_train: int = param(0, "training pairs drawn (seeded); 0 = all")
    n_eval: int = param(0, "evaluation images drawn (seeded); 0 = all")
    n_probe: int = param(10000, "linear-probe images from the evaluation set's train split (seeded); 0 = all")
    n_heldout: int = param(1000, "pairs held out of the training data (never trained on) for retrieval recall@k")
    load: Literal["auto", "memory", "lazy"] = param(
        "auto", "memory (decode all pairs once), lazy (decode each batch; local files and shards) "
                "or auto (lazy above 8 GiB of decoded images)")
    # Added after release: hash_default=False keeps the run ids of every cell without it.
    finetune: str = param("", "clean fine-tuning pairs for post-training repairs (--finetune-data): csv:PATH or wds:URLS, "
                              "the format of train; decoded into memory; empty = none", hash_default=False)


@register_dataset("files")
class Files:
    """Image–caption pairs from CSV/TSV or WebDataset shards, with a separate evaluation set.

    The training files are only read: poisoned pairs live in memory and in the run's own output
    (``poison_files``), never in the user's data. Pairs are decoded into memory (uint8 at
    ``image_size``: 64 px is 12 KiB a pair, 224 px 147 KiB) or, with ``load`` lazy (auto above
    8 GiB), decoded batch by batch during training (``lazy.LazyImages``).
    """

    Params = FilesParams
    # bench run --data / --eval fill these parameters (datasets.base.Dataset.cli_options)
    cli_options = {"data": "train", "eval": "eval", "finetune": "finetune"}

    def __init__(self, params: FilesParams):
        if not params.train:
            raise ValueError("dataset files: no training data; give --data csv:PATH or --data wds:URLS")
        if not 0.0 <= params.max_skip_rate < 1.0:
            raise ValueError(f"files: max_skip_rate must be in [0, 1), got {params.max_skip_rate}")
        for name in ("n_train", "n_eval", "n_probe", "n_heldout"):
            if getattr(params, name) < 0:
                raise ValueError(f"files: {name} must be >= 0, got {getattr(params, name)}")
        check_delimiter(params.delimiter)
        if params.train.startswith("wds:") and (params.image_key, params.caption_key) != ("filepath", "title"):
            raise ValueError("files: image_key and caption_key name CSV columns; WebDataset samples are read as their "
                             "image member and .txt caption, so drop them for wds: data")
        if params.image_size != 0 and params.image_size < 8:
            raise ValueError(f"files: image_size must be >= 8 pixels (or 0 = the model's), got {params.image_size}")
        self.params = params

    def load(self, seed: int) -> DatasetBundle:
        """Read and decode the pairs and the evaluation set; hold ``n_heldout`` pairs out.

        Raises FileNotFoundError (missing file, shard or folder) or ValueError (bad layout, or
        more unreadable training, fine-tuning, evaluation or linear-probe images than
        ``max_skip_rate``; the message lists the first ones).
        """
        p = self.params
        if p.image_size == 0:
            raise ValueError("files: image_size is 0; resolve the config (config.resolve sets the model's size)")
        pairs = read_pairs(p.train, p.image_size, p.image_key, p.caption_key, p.delimiter, p.load)
        self._check_skips(p.train, pairs)
        g = torch.Generator().manual_seed(seed)
        ev, probe, eval_skipped = load_eval(p.eval, p.image_size, p.n_eval, p.n_probe, g, p.max_skip_rate)
        class_words = eval_class_words(p.eval, ev.classnames)
        labels = label_by_caption(pairs.captions, class_words)
        everything = CaptionDataset(pairs.images, pairs.captions, labels)
        order = torch.randperm(len(everything), generator=g)
        if p.n_heldout >= len(everything):
            raise ValueError(f"files: n_heldout={p.n_heldout} leaves no training pairs of {len(everything)}")
        held = order[: p.n_heldout].sort().values
        rest = order[p.n_heldout :].sort().values
        if p.n_train:
            if p.n_train > len(rest):
                raise ValueError(f"files: n_train={p.n_train} exceeds the {len(rest)} pairs left after n_heldout; train on "
                                 f"all of them with --dataset-param n_train=0, or lower n_heldout")
            rest = rest[torch.randperm(len(rest), generator=g)[: p.n_train]].sort().values
        heldout = None
        if p.n_heldout:  # decoded: the evaluation code takes in-memory images
            heldout = CaptionDataset(everything.images[held], [everything.captions[i] for i in held.tolist()], labels[held])
        finetune = None
        if p.finetune:  # a separate source: its pairs are the user's to keep apart from the training data
            ft = read_pairs(p.finetune, p.image_size, p.image_key, p.caption_key, p.delimiter, "memory")
            self._check_skips(p.finetune, ft)
            finetune = CaptionDataset(ft.images, ft.captions, label_by_caption(ft.captions, class_words))
        return DatasetBundle(everything.subset(rest), ev, class_words, ["a photo of {}."], probe, heldout,
                             skipped=len(pairs.skipped), eval_skipped=eval_skipped, finetune=finetune)

    def _check_skips(self, source: str, pairs: Pairs) -> None:
        """ValueError when ``source`` gave no pair, or more unreadable images than ``max_skip_rate``
        (the message lists the first ones)."""
        total = len(pairs.captions) + len(pairs.skipped)
        if total == 0:
            raise ValueError(f"{source}: no image–caption pairs")
        check_skip_rate(source, pairs.skipped, total, self.params.max_skip_rate)


    def write_poison(self, train: CaptionDataset, folder: Path) -> Path:
        """The poisoned pairs of ``train`` written under ``folder`` in the format of the training
        data (``write_poison`` below; the dataset hook of ``datasets.base.Dataset``). Returns the
        CSV or shard written."""
        p = self.params
        return write_poison(train, p.train, folder, p.image_key, p.caption_key)


def eval_class_words(spec: str, classnames: list[str]) -> list[list[str]]:
    """Words that name each evaluation class in a caption: Fashion-MNIST's synonyms, else the
    class name itself."""
    if spec == "fashion-mnist":
        return [list(w) for w in CLASS_WORDS]
    return [[name] for name in classnames]


def write_poison(train: CaptionDataset, spec: str, folder: str | Path, image_key: str = "filepath",
                 caption_key: str = "title") -> Path:
    """Write the poisoned pairs of ``train`` (rows flagged in ``train.is_poison``) in the format of
    the source ``spec``, next to, never into, the user's data: for ``csv:`` a ``poison.csv`` with
    the same columns and the images as PNG files beside it; for ``wds:`` one shard
    ``poison-000000.tar`` (``.png`` + ``.txt`` per sample, written with webdataset's TarWriter).
    Another trainer can then read the user's files plus these to reproduce the poisoned set.

    The folder is written whole or not at all (built under a temporary name, then renamed).
    Returns the file written (CSV or shard).
    """
    folder = Path(folder)
    rows = train.is_poison.nonzero().squeeze(1).tolist()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pngs = [_png(train.images[r]) for r in rows]
    captions = [train.captions[r] for r in rows]
    if spec.startswith("wds:"):
        import webdataset as wds

        name = "poison-000000.tar"
        with wds.TarWriter(str(tmp / name)) as sink:
            for i, (png, caption) in enumerate(zip(pngs, captions)):
                sink.write({"__key__": f"poison{i:06d}", "png": png, "txt": caption})
    else:
        import pandas as pd

        name = "poison.csv"
        (tmp / "images").mkdir()
        for i, png in enumerate(pngs):
            (tmp / "images" / f"{i:06d}.png").write_bytes(png)
        pd.DataFrame({image_key: [f"images/{i:06d}.png" for i in range(len(rows))], caption_key: captions}).to_csv(
            tmp / name, index=False)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder / name


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()
