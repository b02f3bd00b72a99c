"""Evaluation sets for training data from files: ImageNet, CIFAR-10/100, any ImageFolder, and
Fashion-MNIST's test split.

Each is read from a local folder and never downloaded. Images are decoded to uint8 at the
requested size (shorter side resized, centre crop); an unreadable image is skipped and counted.
Zero-shot prompts are the 80 OpenAI ImageNet templates (Radford et al. 2021, as RoCLIP and
CleanCLIP evaluate; docs/roclip-spec.md §2), shipped in ``poisonbench/data``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from poisonbench.preprocess import eval_geometry

from .base import EvalSet, draw_rows
from .images import UNREADABLE, check_skip_rate, decode_image, unreadable_reason

# pandas, torchvision.datasets and the Fashion-MNIST reader are imported inside the functions that
# read those sets: only runs on such a set need them (start-up time).

EVAL_KINDS = ("fashion-mnist", "imagenet", "cifar10", "cifar100", "imagefolder")


def shipped_lines(name: str) -> list[str]:
    """Lines of a text file shipped in ``poisonbench/data`` (e.g. ``imagenet_classnames.txt``)."""
    text = resources.files("poisonbench").joinpath("data", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names of OpenAI's CLIP, in the order of the sorted WordNet ids
    (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``).

    Not unique: "missile" is class 657 (n03773504) and 744 (n04008634), "sunglasses" 836
    (n04355933) and 837 (n04356056); ``imagenet_wnids`` tells them apart."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids (``n01440764`` ...), sorted, which is the class order of
    ``imagenet_classnames`` and of an ImageFolder of the ILSVRC-2012 class folders.

    Source: timm 1.0.31, ``timm/data/_info/imagenet_synsets.txt`` (shipped as
    ``imagenet_wnids.txt``; tests check it is sorted and unique)."""
    return shipped_lines("imagenet_wnids.txt")


def openai_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates, each with one ``{}`` for the class name
    (``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``, as format strings)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


@dataclass
class Classes:
    """The classes of an evaluation set: names (for prompts), optional unique ids and what they are."""

    names: list[str]
    ids: list[str] | None = None
    id_kind: str = "id"


@dataclass
class Labelled:
    """Labelled images before decoding: image files (or decoded uint8 [N, 3, H, W]) and labels."""

    files: list[Path] | None
    images: torch.Tensor | None
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    where: str = ""  # where they were listed, for messages: "the class folders of ROOT/val", "ROOT/labels.csv"


def parse_eval(spec: str) -> tuple[str, Path | None]:
    """``kind:ROOT`` (or ``fashion-mnist``) -> (kind, root). Raises ValueError naming the kinds."""
    kind, _, root = spec.partition(":")
    if kind not in EVAL_KINDS:
        raise ValueError(f"unknown evaluation set {spec!r}; valid: fashion-mnist, "
                         + ", ".join(f"{k}:ROOT" for k in EVAL_KINDS[1:]))
    if kind == "fashion-mnist":
        return kind, None
    if not root:
        raise ValueError(f"evaluation set {kind} needs its folder: give --eval {kind}:ROOT")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{kind}: no folder at {path}")
    return kind, path


def load_eval(spec: str, size: int, n_eval: int, n_probe: int, g: torch.Generator,
              max_skip_rate: float = 0.01) -> tuple[EvalSet, EvalSet | None, int]:
    """The evaluation set ``spec`` and, where the dataset has a train split, linear-probe images.

    Args:
        spec: ``fashion-mnist``, ``imagenet:ROOT``, ``cifar10:ROOT``, ``cifar100:ROOT`` or
            ``imagefolder:ROOT`` (ROOT/<class>/*.png|jpg..., or ROOT/val/<class>/... (or
            ROOT/validation, ROOT/test: the first present, as torchvision and Hugging Face
            layouts name it) with an optional ROOT/train/<class>/... for the probe, with the same
            class folders; class names from ROOT/classnames.txt, else the folder names; ROOT
            whose class folders would be split names, e.g. train and validation, is refused).
            classnames.txt (UTF-8, with or without a byte-order mark) has either one name per
            line, in sorted folder order (refused when folder names hold numbers that sort
            differently as strings, e.g. 0, 1, 10, 2, or when a line is the name of another
            folder, i.e. the lines are folder names in another order), or lines
            ``folder<TAB>name``, which map by folder and give the class order (every folder
            exactly once, no empty name).
            ``imagenet:ROOT`` is an ImageFolder of exactly the 1000 WordNet-id folders
            (ROOT/val, and ROOT/train for the probe) or, as RoCLIP and CleanCLIP read it,
            ROOT/labels.csv with columns ``image`` (path relative to ROOT) and ``label`` (0..999,
            the index in sorted WordNet-id order).
        size: side of the decoded images, pixels.
        n_eval, n_probe: images drawn (seeded by ``g``) from the split; 0 = all.
        max_skip_rate: the largest fraction of the drawn evaluation (and, separately, linear-probe)
            images that may be unreadable (the ``files`` dataset's parameter of that name).
    Returns:
        (eval, probe or None, number of unreadable images skipped).
    Raises:
        FileNotFoundError: the folder or its files are not there. ValueError: a bad layout
        (imagenet class folders that are not the 1000 WordNet ids, classnames.txt that does not
        match the folders, split folders taken for classes, class folders without images, CIFAR
        labels outside its class list), or more unreadable images than ``max_skip_rate`` (the
        message names the first ones).
    """
    kind, root = parse_eval(spec)
    if kind == "fashion-mnist":
        from .fashion_mnist import CLASSNAMES, ZERO_SHOT_TEMPLATES, find_root, load_split

        fm = find_root()
        splits = {s: Labelled(None, *load_split(fm, s)) for s in ("test", "train")}
        for s in splits.values():
            s.labels = s.labels.tolist()
        classes, templates = Classes(list(CLASSNAMES)), list(ZERO_SHOT_TEMPLATES)
    elif kind in ("cifar10", "cifar100"):
        classes, splits = _cifar(kind, root)
        templates = openai_templates()
    else:
        classes, splits = _imagenet(root) if kind == "imagenet" else _imagefolder(root)
        templates = openai_templates()
    ev = _decode(splits["test"], n_eval, size, g, classes, templates, kind, "n_eval", "evaluation", max_skip_rate)
    probe = None
    if "train" in splits:
        probe = _decode(splits["train"], n_probe, size, g, classes, templates, kind, "n_probe", "linear-probe",
                        max_skip_rate)
    skipped = len(ev.skipped) + (len(probe.skipped) if probe else 0)
    return ev.set, (probe.set if probe else None), skipped


@dataclass
class _Decoded:
    set: EvalSet
    skipped: list


def _decode(split: Labelled, k: int, size: int, g: torch.Generator, classes: Classes, templates, kind: str,
            count: str, role: str, max_skip_rate: float) -> _Decoded:
    """Draw ``k`` (the parameter ``count``, e.g. n_eval) images of ``split`` and decode them;
    ValueError when the split lists no image or more than ``max_skip_rate`` of those drawn cannot
    be read (``role`` names them in messages: "evaluation", "linear-probe")."""
    what = f"{kind}: {count}"
    def evalset(images, labels) -> EvalSet:
        return EvalSet(images, labels, classes.names, templates, classes.ids, classes.id_kind)

    n = len(split.labels)
    if n == 0:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        hint = f" (image files: {', '.join(IMG_EXTENSIONS)})" if split.where.startswith("the class folders") else ""
        raise ValueError(f"{kind}: no {role} images in {split.where or 'the split'}{hint}")
    idx = draw_rows(n, k, g, what).tolist()
    labels = torch.tensor(split.labels, dtype=torch.int64)
    if split.images is not None:
        return _Decoded(evalset(eval_geometry(split.images[idx], size), labels[idx]), [])
    images, keep, skipped = [], [], []
    for i in idx:
        try:
            images.append(decode_image(split.files[i].read_bytes(), size))
            keep.append(i)
        except UNREADABLE as e:
            skipped.append((str(split.files[i]), unreadable_reason(e)))
    check_skip_rate(f"{kind}: {split.where}", skipped, len(idx), max_skip_rate, f"{role} images")
    if not images:  # max_skip_rate < 1 refuses this first; kept for callers passing 1
        raise ValueError(f"{what}: none of the {len(idx)} {role} images could be read (first: {skipped[:1]})")
    return _Decoded(evalset(torch.stack(images), labels[keep]), skipped)


def _cifar(kind: str, root: Path) -> tuple[Classes, dict[str, Labelled]]:
    """torchvision's CIFAR reader on the python version's pickles; their class list (the meta
    file's) must have 10 (100) names and every label must index it (ValueError otherwise)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, expected = (CIFAR10, 10) if kind == "cifar10" else (CIFAR100, 100)
    splits = {}
    for split, train in (("test", False), ("train", True)):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
            raise FileNotFoundError(f"{kind}: no readable {kind} under {root}; put the python version's folder "
                                    f"{folder} there (nothing is downloaded)") from None
        if len(ds.classes) != expected:
            raise ValueError(f"{kind}: the class list under {root} has {len(ds.classes)} names, expected {expected}; "
                             f"is this {kind}'s python version?")
        labels = [int(y) for y in ds.targets]
        if labels and not 0 <= min(labels) <= max(labels) < expected:
            bad = next(y for y in labels if not 0 <= y < expected)
            raise ValueError(f"{kind}: the {split} split under {root} has label {bad}, outside the {expected} classes "
                             f"(0..{expected - 1}); the data do not match {kind}'s class list")
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits[split] = Labelled(None, images, labels)
    return Classes([c.replace("_", " ") for c in ds.classes]), splits


IMAGENET_LAYOUTS = ("The accepted layouts: ROOT/val/<WordNet id>/... (and ROOT/train/<WordNet id>/... for the "
                    "linear probe) with exactly the 1000 ImageNet-1k WordNet-id folders (n01440764, ...); "
                    "ROOT/labels.csv with columns image and label (0..999, the index in sorted WordNet-id order); "
                    "or, for another class set, imagefolder:ROOT with ROOT/classnames.txt")


def _imagenet(root: Path) -> tuple[Classes, dict[str, Labelled]]:
    names = imagenet_classnames()
    classes = Classes(names, imagenet_wnids(), "WordNet id")
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        import pandas as pd

        table = pd.read_csv(labels_csv, dtype={"image": str})
        if not {"image", "label"} <= set(table.columns):
            raise ValueError(f"{labels_csv}: needs columns image and label; has {', '.join(table.columns)}")
        labels = [int(x) for x in table["label"]]
        if labels and not 0 <= min(labels) <= max(labels) < len(names):
            raise ValueError(f"{labels_csv}: labels must be in 0..{len(names) - 1}")
        return classes, {"test": Labelled([root / p for p in table["image"]], None, labels, where=str(labels_csv))}
    folders = _split_folders(root, "imagenet")
    splits = {s: _scan(d) for s, d in folders.items()}
    for s, (found, _) in splits.items():
        _check_wnid_folders(folders[s], found, classes.ids)
    return classes, {s: lab for s, (_, lab) in splits.items()}


def _check_wnid_folders(folder: Path, found: list[str], wnids: list[str]) -> None:
    """ValueError unless the class folders ``found`` in ``folder`` are exactly the WordNet ids
    ``wnids`` (the folders are mapped to classes by name, so any other set would mislabel)."""
    if found == wnids:
        return
    known = set(wnids)
    foreign = [f for f in found if f not in known]
    present = set(found)
    missing = [w for w in wnids if w not in present]
    parts = []
    if foreign:
        parts.append(f"{len(foreign)} folder(s) that are not ImageNet WordNet ids (e.g. {', '.join(foreign[:5])})")
    if missing:
        parts.append(f"{len(missing)} of the 1000 WordNet ids missing (e.g. {', '.join(missing[:3])})")
    hint = ""
    if foreign and all(f.isdigit() for f in foreign):
        hint = ("; folders named by class number are not read by name order (10 would sort before 2): "
                "write ROOT/labels.csv or rename them to their WordNet ids")
    raise ValueError(f"imagenet: {folder} has {len(found)} class folders, with {' and '.join(parts)}{hint}. "
                     + IMAGENET_LAYOUTS)


def _imagefolder(root: Path) -> tuple[Classes, dict[str, Labelled]]:
    folders = _split_folders(root, "imagefolder")
    found = {s: _class_folders(d) for s, d in folders.items()}
    if "train" in found and found["train"] != found["test"]:
        only = sorted(set(found["train"]) ^ set(found["test"]))
        raise ValueError(f"imagefolder: {folders['train']} and {folders['test']} have different class folders "
                         f"(e.g. {', '.join(only[:5])} only in one); the probe needs the same classes")
    order, names = _imagefolder_names(root / "classnames.txt", found["test"])
    splits = {s: _scan(d, order) for s, d in folders.items()}
    return Classes(names, order, "folder name"), {s: lab for s, (_, lab) in splits.items()}


def _natural_key(name: str) -> tuple:
    # isdecimal, not isdigit: "²" is a digit that int() refuses (a folder "10²" would crash the sort)
    return tuple((0, int(t), "") if t.isdecimal() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def _imagefolder_names(names_file: Path, folders: list[str]) -> tuple[list[str], list[str]]:
    """(class folders in class order, class names) for an ImageFolder whose class folders
    are ``folders`` (sorted). Without ``names_file``: sorted folders, named by their folder
    (``_`` read as a space). With it, one of two forms (ValueError when it does not match the
    folders; read as UTF-8, a byte-order mark dropped): every line ``folder<TAB>name``, in the
    class order wanted, no name empty; or one name per line, in sorted folder order, refused
    when folder names hold numbers that sort differently as strings than as numbers (``0, 1,
    10, 2``: the names would be silently shifted), and when a line is the name of another
    folder (``_`` read as a space, any case): the lines are then the folder names in another
    order (e.g. ``ls`` in a locale that sorts ``trouser`` before ``t-shirt``), which would swap
    those classes' labels."""
    if not names_file.is_file():
        return folders, [c.replace("_", " ") for c in folders]
    raw = [line for line in names_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    tabbed = ["\t" in line for line in raw]
    lines = [line.strip() for line in raw]
    if any(tabbed):
        if not all(tabbed):
            raise ValueError(f"{names_file}: mixes folder<TAB>name lines with plain names; use one form throughout")
        pairs = [tuple(part.strip() for part in line.split("\t", 1)) for line in raw]
        empty = [f for f, name in pairs if not name]
        if empty:
            raise ValueError(f"{names_file}: empty class name for folder {empty[0]}"
                             + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                             + "; write each line as folder<TAB>name")
        order, present = [f for f, _ in pairs], set(folders)
        unknown = [f for f in order if f not in present]
        if unknown:
            raise ValueError(f"{names_file}: folder(s) {', '.join(unknown[:5])} named there are not class folders "
                             f"of {names_file.parent} (found: {', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''})")
        listed = set(order)
        repeated = sorted({f for f in order if order.count(f) > 1}) if len(listed) < len(order) else []
        unnamed = [f for f in folders if f not in listed]
        if repeated or unnamed:
            what = (f"folder(s) {', '.join(repeated[:5])} listed twice" if repeated
                    else f"class folder(s) {', '.join(unnamed[:5])} have no line")
            raise ValueError(f"{names_file}: {what}; give every class folder exactly one folder<TAB>name line")
        return order, [n for _, n in pairs]
    if len(lines) != len(folders):
        raise ValueError(f"{names_file} has {len(lines)} names for {len(folders)} class folders")
    if any(ch.isdigit() for f in folders for ch in f) and sorted(folders, key=_natural_key) != folders:
        raise ValueError(
            f"{names_file}: names are matched to the class folders in sorted string order "
            f"({', '.join(folders[:4])}, ...), which differs from their numeric order; write each line as "
            f"folder<TAB>name so that every name goes with its folder")
    key = lambda text: " ".join(text.replace("_", " ").split()).lower()  # noqa: E731
    position = {key(f): i for i, f in enumerate(folders)}
    moved = [(line, folders[position[key(line)]], folders[i]) for i, line in enumerate(lines)
             if position.get(key(line), i) != i]
    if moved:
        line, named, at = moved[0]
        raise ValueError(
            f"{names_file}: line {line!r} names folder {named}, but plain lines are matched to the class folders in "
            f"sorted order, which gives it to folder {at}; {len(moved)} line(s) are folder names in another order. "
            f"Write the names in sorted folder order ({', '.join(folders[:4])}{', ...' if len(folders) > 4 else ''}), "
            f"or each line as folder<TAB>name")
    return folders, lines


EVAL_SPLITS = ("val", "validation", "test")  # evaluation split folders, in order of preference
# folder names that are splits, not classes: a ROOT whose class folders include one is refused
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval",
                         "evaluation", "dev"})


def _split_folders(root: Path, kind: str) -> dict[str, Path]:
    """The first of ROOT/val, ROOT/validation, ROOT/test (the evaluation split) and ROOT/train when
    present; ROOT itself otherwise. ValueError when ROOT is the split and some of its folders are
    split names (train, validation, ...): read as classes, they would make a set of classes
    "train" and "validation"."""
    test = next((root / s for s in EVAL_SPLITS if (root / s).is_dir()), root)
    out = {"test": test}
    if test != root and (root / "train").is_dir():
        out["train"] = root / "train"
    if test == root:
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_NAMES)
        if splits:
            raise ValueError(
                f"{kind}: {root} has the folder(s) {', '.join(splits)}, which are split names, not classes. The accepted "
                f"layouts: ROOT/<class>/<image> (no split folders); or ROOT/val/<class>/... (or ROOT/validation, "
                f"ROOT/test), with an optional ROOT/train/<class>/... for the linear probe")
    return out


def _class_folders(folder: Path) -> list[str]:
    """The class folders in ``folder``, sorted (torchvision's ``find_classes``)."""
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{folder}: no class folders ({e})") from None


def _scan(folder: Path, order: list[str] | None = None) -> tuple[list[str], Labelled]:
    """(class folders, their images labelled by the folder's position in ``order``, default the
    sorted folders)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    classes = _class_folders(folder) if order is None else order
    index = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(str(folder), index, extensions=IMG_EXTENSIONS, allow_empty=True)
    return classes, Labelled([Path(p) for p, _ in samples], None, [y for _, y in samples],
                             where=f"the class folders of {folder}")
