"""Evaluation sets for training data from files: ImageNet, CIFAR-10/100, any ImageFolder, and
Fashion-MNIST's test split.

Each is read from a local folder and never downloaded. Images are decoded to uint8 at the
requested size (shorter side resized, centre crop); an unreadable image is skipped and counted.
Zero-shot prompts are the 80 OpenAI ImageNet templates (Radford et al. 2021, as RoCLIP and
CleanCLIP evaluate; docs/roclip-spec.md §2), shipped in ``poisonbench/data``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from poisonbench.preprocess import eval_geometry

from .base import EvalSet, draw_rows
from .images import decode_image

# pandas, torchvision.datasets and the Fashion-MNIST reader are imported inside the functions that
# read those sets: only runs on such a set need them (start-up time).

EVAL_KINDS = ("fashion-mnist", "imagenet", "cifar10", "cifar100", "imagefolder")


def shipped_lines(name: str) -> list[str]:
    """Lines of a text file shipped in ``poisonbench/data`` (e.g. ``imagenet_classnames.txt``)."""
    text = resources.files("poisonbench").joinpath("data", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names of OpenAI's CLIP, in the order of the sorted WordNet ids."""
    return shipped_lines("imagenet_classnames.txt")


def openai_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates, each with one ``{}`` for the class name."""
    return shipped_lines("openai_imagenet_templates.txt")


@dataclass
class Labelled:
    """Labelled images before decoding: image files (or decoded uint8 [N, 3, H, W]) and labels."""

    files: list[Path] | None
    images: torch.Tensor | None
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)


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


def load_eval(spec: str, size: int, n_eval: int, n_probe: int, g: torch.Generator) -> tuple[EvalSet, EvalSet | None, int]:
    """The evaluation set ``spec`` and, where the dataset has a train split, linear-probe images.

    Args:
        spec: ``fashion-mnist``, ``imagenet:ROOT``, ``cifar10:ROOT``, ``cifar100:ROOT`` or
            ``imagefolder:ROOT`` (ROOT/<class>/*.png|jpg..., or ROOT/val/<class>/... with an
            optional ROOT/train/<class>/... for the probe; class names from ROOT/classnames.txt,
            one per line in sorted folder order, else the folder names).
            ``imagenet:ROOT`` is an ImageFolder of the 1000 WordNet-id folders (ROOT/val, and
            ROOT/train for the probe) or, as RoCLIP and CleanCLIP read it, ROOT/labels.csv with
            columns ``image`` (path relative to ROOT) and ``label`` (0..999).
        size: side of the decoded images, pixels.
        n_eval, n_probe: images drawn (seeded by ``g``) from the split; 0 = all.
    Returns:
        (eval, probe or None, number of unreadable images skipped).
    Raises:
        FileNotFoundError: the folder or its files are not there. ValueError: a bad layout.
    """
    kind, root = parse_eval(spec)
    if kind == "fashion-mnist":
        from .fashion_mnist import CLASSNAMES, ZERO_SHOT_TEMPLATES, find_root, load_split

        fm = find_root()
        splits = {s: Labelled(None, *load_split(fm, s)) for s in ("test", "train")}
        for s in splits.values():
            s.labels = s.labels.tolist()
        classnames, templates = list(CLASSNAMES), list(ZERO_SHOT_TEMPLATES)
    elif kind in ("cifar10", "cifar100"):
        classnames, splits = _cifar(kind, root)
        templates = openai_templates()
    else:
        classnames, splits = _imagenet(root) if kind == "imagenet" else _imagefolder(root)
        templates = openai_templates()
    ev = _decode(splits["test"], n_eval, size, g, classnames, templates, f"{kind}: n_eval")
    probe = None
    if "train" in splits:
        probe = _decode(splits["train"], n_probe, size, g, classnames, templates, f"{kind}: n_probe")
    skipped = len(ev.skipped) + (len(probe.skipped) if probe else 0)
    return ev.set, (probe.set if probe else None), skipped


@dataclass
class _Decoded:
    set: EvalSet
    skipped: list


def _decode(split: Labelled, k: int, size: int, g: torch.Generator, classnames, templates, what: str) -> _Decoded:
    n = len(split.labels)
    idx = draw_rows(n, k, g, what).tolist()
    labels = torch.tensor(split.labels, dtype=torch.int64)
    if split.images is not None:
        return _Decoded(EvalSet(eval_geometry(split.images[idx], size), labels[idx], classnames, templates), [])
    images, keep, skipped = [], [], []
    for i in idx:
        try:
            images.append(decode_image(split.files[i].read_bytes(), size))
            keep.append(i)
        except (OSError, ValueError) as e:
            skipped.append((str(split.files[i]), str(e)))
    if not images:
        raise ValueError(f"{what}: none of the {len(idx)} images could be read (first: {skipped[:1]})")
    return _Decoded(EvalSet(torch.stack(images), labels[keep], classnames, templates), skipped)


def _cifar(kind: str, root: Path) -> tuple[list[str], dict[str, Labelled]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    splits = {}
    for split, train in (("test", False), ("train", True)):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
            raise FileNotFoundError(f"{kind}: no readable {kind} under {root}; put the python version's folder "
                                    f"{folder} there (nothing is downloaded)") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits[split] = Labelled(None, images, list(ds.targets))
    return [c.replace("_", " ") for c in ds.classes], splits


def _imagenet(root: Path) -> tuple[list[str], dict[str, Labelled]]:
    names = imagenet_classnames()
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        import pandas as pd

        table = pd.read_csv(labels_csv, dtype={"image": str})
        if not {"image", "label"} <= set(table.columns):
            raise ValueError(f"{labels_csv}: needs columns image and label; has {', '.join(table.columns)}")
        labels = [int(x) for x in table["label"]]
        if labels and not 0 <= min(labels) <= max(labels) < len(names):
            raise ValueError(f"{labels_csv}: labels must be in 0..{len(names) - 1}")
        return names, {"test": Labelled([root / p for p in table["image"]], None, labels)}
    folders = _split_folders(root)
    splits = {s: _scan(d) for s, d in folders.items()}
    n = len(splits["test"][0])
    if n != len(names):
        raise ValueError(f"imagenet: {folders['test']} has {n} class folders, expected the {len(names)} WordNet ids "
                         "(or give ROOT/labels.csv; for another class set use imagefolder:ROOT)")
    return names, {s: lab for s, (_, lab) in splits.items()}


def _imagefolder(root: Path) -> tuple[list[str], dict[str, Labelled]]:
    folders = _split_folders(root)
    splits = {s: _scan(d) for s, d in folders.items()}
    classes = splits["test"][0]
    names_file = root / "classnames.txt"
    names = [c.replace("_", " ") for c in classes]
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != len(classes):
            raise ValueError(f"{names_file} has {len(names)} names for {len(classes)} class folders")
    if "train" in splits and splits["train"][0] != classes:
        raise ValueError(f"imagefolder: {folders['train']} and {folders['test']} have different class folders")
    return names, {s: lab for s, (_, lab) in splits.items()}


def _split_folders(root: Path) -> dict[str, Path]:
    """ROOT/val (or ROOT/test) and ROOT/train when present; ROOT itself otherwise."""
    test = next((root / s for s in ("val", "test") if (root / s).is_dir()), root)
    out = {"test": test}
    if test != root and (root / "train").is_dir():
        out["train"] = root / "train"
    return out


def _scan(folder: Path) -> tuple[list[str], Labelled]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, index = find_classes(str(folder))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{folder}: no class folders ({e})") from None
    samples = make_dataset(str(folder), index, extensions=IMG_EXTENSIONS, allow_empty=True)
    return classes, Labelled([Path(p) for p, _ in samples], None, [y for _, y in samples])
