"""Data containers shared by datasets, attacks, the trainer and the evaluator."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


def is_lazy(images) -> bool:
    """True for a ``lazy.LazyImages`` (decoded on access), False for an in-memory tensor."""
    return getattr(images, "lazy", False)


@dataclass
class CaptionDataset:
    """In-memory image–caption training pairs.

    Attributes:
        images: uint8 tensor [N, 3, H, W], values 0..255 (RGB; grey images are repeated to 3 channels),
            or a ``lazy.LazyImages`` that decodes rows when indexed (data too large for memory).
        captions: N caption strings.
        labels: int64 tensor [N]; the class index of each pair where the dataset knows it, -1 otherwise
            (poisoned pairs carry the label of their source image, not the target label).
        is_poison: bool tensor [N]; True for pairs an attack added or replaced.
    """

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    is_poison: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        n = self.images.shape[0]
        if self.is_poison is None:
            self.is_poison = torch.zeros(n, dtype=torch.bool)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if not (len(self.captions) == n == self.labels.shape[0] == self.is_poison.shape[0]):
            raise ValueError(
                f"lengths differ: {n} images, {len(self.captions)} captions, "
                f"{self.labels.shape[0]} labels, {self.is_poison.shape[0]} poison flags"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> "CaptionDataset":
        """Rows ``index`` (int64 [M]) as a new dataset (a copy of in-memory images; lazy ones stay lazy)."""
        images = self.images.take(index) if is_lazy(self.images) else self.images[index]
        return CaptionDataset(images, [self.captions[i] for i in index.tolist()], self.labels[index], self.is_poison[index])

    def append(self, other: "CaptionDataset") -> "CaptionDataset":
        """This dataset followed by ``other`` (images must have the same size)."""
        if is_lazy(other.images):
            raise ValueError("only in-memory images can be appended to a training set")
        images = self.images.cat(other.images) if is_lazy(self.images) else torch.cat([self.images, other.images])
        return CaptionDataset(
            images,
            self.captions + other.captions,
            torch.cat([self.labels, other.labels]),
            torch.cat([self.is_poison, other.is_poison]),
        )

    def captions_naming(self, words: list[str]) -> list[int]:
        """Indices of captions that contain any of ``words`` as whole words (case-insensitive)."""
        pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
        return [i for i, c in enumerate(self.captions) if pattern.search(c)]


@dataclass
class EvalSet:
    """Labelled evaluation images for zero-shot classification.

    Attributes:
        images: uint8 tensor [M, 3, H, W], values 0..255.
        labels: int64 tensor [M], class indices into ``classnames``.
        classnames: class names used to build zero-shot prompts.
        templates: prompt templates with one ``{}`` for the class name.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def class_index(self, name: str) -> int:
        """Index of class ``name`` (exact or case-insensitive match); ValueError listing the classes otherwise."""
        for i, c in enumerate(self.classnames):
            if c == name or c.lower() == name.lower():
                return i
        if len(self.classnames) <= 30:
            raise ValueError(f"class {name!r} is not in the evaluation classes: {', '.join(self.classnames)}")
        import difflib

        close = difflib.get_close_matches(name.lower(), [c.lower() for c in self.classnames], n=5, cutoff=0.5)
        close += [c for c in self.classnames if name.lower() in c.lower() and c.lower() not in close][:5]
        raise ValueError(f"class {name!r} is not among the {len(self.classnames)} evaluation classes; closest: "
                         f"{', '.join(close[:8]) or '(none)'}")


def draw_rows(n: int, k: int, g: torch.Generator, what: str) -> torch.Tensor:
    """Sorted row indices int64 [k] drawn without replacement from ``n`` (seeded by ``g``); all
    ``n`` when ``k`` is 0 or ``n``. ValueError when ``k`` exceeds ``n``."""
    if k == 0 or k == n:
        return torch.arange(n)
    if not 0 <= k <= n:
        raise ValueError(f"{what}={k} exceeds the {n} images available")
    return torch.randperm(n, generator=g)[:k].sort().values


def with_article(phrase: str) -> str:
    """``phrase`` with the indefinite article its first letter calls for: "an overcoat", "a bag".

    By spelling (a vowel letter takes "an"), which is right for every class word shipped here.
    """
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


@dataclass
class DatasetBundle:
    """What a registered dataset provides for one run.

    Attributes:
        train: the clean training pairs.
        eval: the evaluation split with its class names and zero-shot templates.
        class_words: for each class, the words a caption uses for it (the class name and synonyms);
            attacks use them to find or write captions naming a class.
        caption_templates: templates with one ``{}`` for a noun phrase with its article
            (``with_article``), for writing a caption of a class when the training captions have
            none naming it.
        probe_train: labelled images of the evaluation dataset's train split for the linear probe
            (tested on ``eval``), or None when the dataset has none.
        heldout: clean image–caption pairs never trained on, for retrieval recall@k, or None.
        skipped / eval_skipped: training / evaluation images left out because they could not be
            read (files only; recorded in the result row).
    """

    train: CaptionDataset
    eval: EvalSet
    class_words: list[list[str]]
    caption_templates: list[str]
    probe_train: EvalSet | None = None
    heldout: CaptionDataset | None = None
    skipped: int = 0
    eval_skipped: int = 0


class Dataset:
    """The interface of a registered dataset (``@register_dataset("name")``). Built-in datasets
    follow it without subclassing; a plugin may subclass it or not. The engine (runner, grid,
    CLI) reaches a dataset only through this interface, never by its name.

    Required:
        ``Params``: a dataclass of the dataset's parameters (``registry.param`` fields).
        ``__init__(self, params)``: keep ``params``; ValueError naming a bad value (checked before
        any data is read).
        ``load(self, seed: int) -> DatasetBundle``: the clean data of one run, seeded by ``seed``.

    Optional (the engine uses them when the class has them):
        ``cli_options``: class attribute, dict mapping the options of ``bench run``/``bench status``
            that this dataset takes, ``"data"`` (``--data``) and ``"eval"`` (``--eval``), to the
            names of its parameters that receive their strings, e.g.
            ``{"data": "train", "eval": "eval"}``. ``--data`` selects the dataset that claims it;
            exactly one registered dataset may claim it.
        ``write_poison(self, train: CaptionDataset, folder: pathlib.Path) -> pathlib.Path | None``:
            write the poisoned pairs of ``train`` (the rows with ``train.is_poison`` True; images
            uint8 [N, 3, H, W]) under ``folder`` (``RESULTS/poison/<run_id>``, which it may create
            or replace whole, and must never be the user's data), in a form other tools can read
            (e.g. the format of the training data). Returns the file to record in the result row's
            ``poison_files`` (a CSV, a shard), or None for nothing written. Called once per cell
            before training, only when the attack poisoned at least one pair.
    """

    cli_options: dict[str, str] = {}
