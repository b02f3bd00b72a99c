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
        """Indices of captions that contain any of ``words`` as whole words (case-insensitive),
        ascending (``CaptionSearch``)."""
        return CaptionSearch(self.captions).naming(words)


class CaptionSearch:
    """Whole-word, case-insensitive search of many captions for a few words, as
    ``re.search(r"\b(?:w1|w2|...)\b", caption, re.IGNORECASE)`` on each caption (the reference
    formulation, which a test compares against) but a few times faster on 60k captions: the
    ASCII captions are lower-cased and joined once, each word is located with ``str.find``, and
    only the captions that contain it as a substring (and every non-ASCII caption, whose case
    folding ``str.lower`` does not mirror) are checked with the regular expression."""

    def __init__(self, captions: list[str]):
        self.captions = captions
        ascii_ = [c.isascii() for c in captions]
        # "\0" separates captions: a non-word character, and no ASCII word contains it
        self.text = "\0".join(c.lower() if a else "" for c, a in zip(captions, ascii_))
        lengths = torch.tensor([len(c) + 1 if a else 1 for c, a in zip(captions, ascii_)], dtype=torch.int64)
        self.starts = torch.cumsum(lengths, 0) - lengths  # where each caption begins in ``text``
        self.non_ascii = [i for i, a in enumerate(ascii_) if not a]

    def naming(self, words: list[str]) -> list[int]:
        """Indices (ascending) of the captions that contain any of ``words`` as a whole word."""
        pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
        if not all(w.isascii() for w in words):  # a non-ASCII word may fold onto ASCII letters: scan all
            return [i for i, c in enumerate(self.captions) if pattern.search(c)]
        found = []
        for w in {w.lower() for w in words}:
            j = self.text.find(w)
            while j >= 0:
                found.append(j)
                j = self.text.find(w, j + 1)
        where = torch.searchsorted(self.starts, torch.tensor(found, dtype=torch.int64), right=True) - 1
        candidates = sorted(set(where.tolist()).union(self.non_ascii))
        return [i for i in candidates if pattern.search(self.captions[i])]


def prompt_key(name: str) -> str:
    """What a class name contributes to its zero-shot prompts: lower-cased, whitespace collapsed.

    Names equal under this key give identical prompt embeddings (open_clip's tokenizer lower-cases
    and collapses whitespace before encoding), hence identical zero-shot classifier columns."""
    return " ".join(name.split()).lower()


@dataclass
class EvalSet:
    """Labelled evaluation images for zero-shot classification.

    Classes are identified by their index everywhere (labels, manifests, metrics); names are for
    prompts and for people, and need not be unique (OpenAI's ImageNet list, used for the prompts,
    names two classes "missile", 657 and 744, and two "sunglasses", 836 and 837).

    Attributes:
        images: uint8 tensor [M, 3, H, W], values 0..255.
        labels: int64 tensor [M], class indices into ``classnames``.
        classnames: class names used to build zero-shot prompts.
        templates: prompt templates with one ``{}`` for the class name.
        class_ids: optional unique id of each class, shown beside a shared name and accepted by
            ``class_index``: the WordNet id for ImageNet (``n04356056``), the folder name for an
            ImageFolder; None when the set has none (Fashion-MNIST, CIFAR).
        id_kind: what ``class_ids`` are, for messages ("WordNet id", "folder name").
    """

    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]
    class_ids: list[str] | None = None
    id_kind: str = "id"

    def __post_init__(self):
        if self.class_ids is not None and len(self.class_ids) != len(self.classnames):
            raise ValueError(f"{len(self.class_ids)} class ids for {len(self.classnames)} class names")

    def __len__(self) -> int:
        return self.images.shape[0]

    def shared_name_classes(self) -> list[int]:
        """Indices (ascending) of the classes whose name another class also has (``prompt_key``
        equal): their zero-shot columns are identical, so top-1 between them is decided by
        tie-breaking, not by the model. Empty when the names are unique."""
        keys = [prompt_key(c) for c in self.classnames]
        count: dict[str, int] = {}
        for k in keys:
            count[k] = count.get(k, 0) + 1
        return [i for i, k in enumerate(keys) if count[k] > 1]

    def display_name(self, i: int) -> str:
        """Class ``i`` as shown to people: its name, followed by its id (or ``#index`` without ids)
        when another class has the same name, e.g. ``sunglasses (n04356056)``."""
        name = self.classnames[i]
        key = prompt_key(name)
        if sum(prompt_key(c) == key for c in self.classnames) < 2:
            return name
        return f"{name} ({self.class_ids[i] if self.class_ids else f'#{i}'})"

    def _describe(self, i: int) -> str:
        return f"#{i} {self.classnames[i]!r}" + (f" ({self.id_kind} {self.class_ids[i]})" if self.class_ids else "")

    def classes_named(self, text: str) -> list[int]:
        """Indices (ascending) of the classes whose name is ``text`` exactly, else of those whose name
        is ``text`` in any case (the classes ``class_index`` looks up by name; several share a name)."""
        exact = [i for i, c in enumerate(self.classnames) if c == text]
        return exact or [i for i, c in enumerate(self.classnames) if c.lower() == text.lower()]

    def selector(self, i: int) -> str:
        """How to select class ``i`` with ``class_index`` by index: ``"836"``, or ``"#836"`` when
        a class is named ``"836"`` (the plain integer would then be ambiguous)."""
        return str(i) if set(self.classes_named(str(i))) <= {i} else f"#{i}"

    def id_selector(self, i: int) -> str | None:
        """Class ``i``'s id when ``class_index`` would select class ``i`` by it, else None: sets
        without ids, and ids that read as an index (an integer folder name such as ``"4"``, or
        ``"#4"``) or as a class name."""
        if not self.class_ids:
            return None
        cid = self.class_ids[i]
        if _index_text(cid) is not None or self.classes_named(cid):
            return None
        return cid

    def class_index(self, name: str | int) -> int:
        """Index of the class ``name`` selects.

        An ``int``, or ``"#N"``, is the index N. Any other string is looked up as: a unique exact
        name, else a unique case-insensitive name; then, for a plain ASCII integer (``"836"``), the
        index; then, for any other string, an id (``class_ids``: a WordNet id, a folder name).
        So an integer is always the index, never an integer-named folder; when it is also the
        name of another class, it is refused as ambiguous (``"#N"`` picks the index).

        Raises ValueError: when a name matches several classes (listing them with index and id,
        and how to pick one), an integer names one class and indexes another, an index is out of
        range, the string is written with non-ASCII digits (e.g. ``"٨"``, ``"８"``, ``"²"``), or
        nothing matches (listing the classes, or the closest names).
        """
        n = len(self.classnames)

        def in_range(k: int) -> int:
            if k < n:
                return k
            raise ValueError(f"class index {k} is out of range: the evaluation set has {n} classes (0..{n - 1})")

        if isinstance(name, int) and not isinstance(name, bool):
            if name < 0:
                raise ValueError(f"class index {name} is negative: the evaluation set has {n} classes (0..{n - 1})")
            return in_range(name)
        name = str(name)
        k = _index_text(name)
        if k is not None and name.strip().startswith("#"):
            return in_range(k)
        matches = self.classes_named(name)
        if len(matches) > 1:
            first = matches[0]
            by_id = self.id_selector(first)
            example = f"target={self.selector(first)}" + (f", or by {self.id_kind}: target={by_id}" if by_id else "")
            raise ValueError(
                f"class {name!r} names {len(matches)} evaluation classes: "
                f"{', '.join(self._describe(i) for i in matches)}; pick one by index (e.g. {example})")
        if matches:
            if k is None or k >= n or k == matches[0]:
                return matches[0]
            m = matches[0]
            other = [f"target=#{k}"] + ([f"target={self.classnames[k]}"] if self.classes_named(self.classnames[k]) == [k]
                                        and _index_text(self.classnames[k]) is None else [])
            named = [f"target=#{m}"] + ([f"target={self.id_selector(m)}"] if self.id_selector(m) else [])
            raise ValueError(
                f"class {name!r} is ambiguous: it is the name of class {self._describe(m)} and the index of class "
                f"{self._describe(k)}; pick class #{k} with {' or '.join(other)}, or the class named {name!r} "
                f"with {' or '.join(named)}")
        if k is not None:
            return in_range(k)
        digits = name.strip().removeprefix("#")
        if digits.isdigit():  # digits, but not ASCII ones: int() would read "٨" as 8 without a word
            raise ValueError(f"class {name!r} is written with non-ASCII digits; give a class index in ASCII "
                             f"digits 0-9 (e.g. 8 or #8), or a class name")
        if self.class_ids is not None and name in self.class_ids:
            return self.class_ids.index(name)
        if n <= 30:
            raise ValueError(f"class {name!r} is not in the evaluation classes: {', '.join(self.classnames)}")
        import difflib

        close = difflib.get_close_matches(name.lower(), [c.lower() for c in self.classnames], n=5, cutoff=0.5)
        close += [c for c in self.classnames if name.lower() in c.lower() and c.lower() not in close][:5]
        raise ValueError(f"class {name!r} is not among the {n} evaluation classes; closest: "
                         f"{', '.join(close[:8]) or '(none)'}")


def _index_text(text: str) -> int | None:
    """The class index a string spells, ``"836"`` or ``"#836"`` (ASCII digits only; surrounding
    whitespace ignored), else None (``"٨"``, ``"８"`` and ``"²"`` are not indices)."""
    digits = text.strip().removeprefix("#")
    return int(digits) if digits.isascii() and digits.isdigit() else None


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
        finetune: clean image–caption pairs for a post-training repair's fine-tuning
            (``defenses.base.PostTrainingRepair``), disjoint from ``train``, ``eval`` and
            ``heldout``; never poisoned (attacks change only ``train``); None when the dataset has
            none (a repair cell is then refused before training).
    """

    train: CaptionDataset
    eval: EvalSet
    class_words: list[list[str]]
    caption_templates: list[str]
    probe_train: EvalSet | None = None
    heldout: CaptionDataset | None = None
    skipped: int = 0
    eval_skipped: int = 0
    finetune: CaptionDataset | None = None


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
            ``{"data": "train", "eval": "eval"}``; ``"finetune"`` (``--finetune-data``) names the
            parameter of a separate clean fine-tuning source. ``--data`` selects the dataset that
            claims it; exactly one registered dataset may claim it.
        ``write_poison(self, train: CaptionDataset, folder: pathlib.Path) -> pathlib.Path | None``:
            write the poisoned pairs of ``train`` (the rows with ``train.is_poison`` True; images
            uint8 [N, 3, H, W]) under ``folder`` (``RESULTS/poison/<run_id>``, which it may create
            or replace whole, and must never be the user's data), in a form other tools can read
            (e.g. the format of the training data). Returns the file to record in the result row's
            ``poison_files`` (a CSV, a shard), or None for nothing written. Called once per cell
            before training, only when the attack poisoned at least one pair.
    """

    cli_options: dict[str, str] = {}
