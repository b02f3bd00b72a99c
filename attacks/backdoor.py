"""Shared machinery of all-to-one backdoor attacks (BadNets, blended, ...).

Poisoning: ``n_poison`` training images whose class is not the target are copied, the trigger is
applied to the copies (uint8, before any normalisation), and each copy is paired with a caption
naming the target label; the pairs are appended to the clean training set.

Where a trigger is applied (the one rule, the same in training and evaluation): at the stored
geometry of the training images, i.e. the size they are decoded to (the dataset's ``image_size``;
by default the model's input size, and 28 px for Fashion-MNIST). Everything after that is the
pixel pipeline of clean data: in training the trainer's augmentation or its resize/crop to the
model's size (``preprocess.eval_geometry``); in evaluation, evaluation images are first brought to
the training images' stored geometry (``base.to_stored_geometry``: ``eval_geometry`` to that size,
the identity for every built-in dataset), the trigger is applied there, then ``eval_geometry`` to
the model's size, as for clean evaluation. So a trained-on trigger and an evaluated trigger are the
same pixels (tests/test_trigger_geometry.py), and when the stored size is the model's size (every
default) the trigger is exact at the model's input. Trigger sizes (e.g. ``patch_size``) are in
pixels of the stored training images.

ASR (docs/DESIGN.md, "Backdoor ASR"): over evaluation images whose true class is not the target,
triggered as above; success is zero-shot top-1 == target.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from poisonbench.datasets.base import CaptionDataset, DatasetBundle, prompt_key
from poisonbench.preprocess import eval_geometry
from poisonbench.registry import param
from poisonbench.utils import derive_seed

from poisonbench.survival import TriggerViews

from .base import Attack, PoisonPlan, ZeroShotModel, class_captions, to_stored_geometry


@dataclass
class BackdoorParams:
    n_poison: int = param(100, "number of poisoned pairs appended to the training set")
    poison_rate: Optional[float] = param(None, "poisoned pairs / all training pairs, in (0, 1); overrides n_poison when set")
    target: str = param("bag", "target label: an evaluation class, by name, by index (836 or #836: an integer is "
                               "always the index) or by id (WordNet id for ImageNet); its name must be unique among "
                               "the classes")


def map_pixels(images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int = 2048) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, H, W]: ``fn`` applied to float32 copies of ``chunk``
    images at a time (it may work in place), each result rounded to the nearest integer and
    clamped to 0..255. Equal to ``fn(images.float()).round().clamp(0, 255).to(torch.uint8)`` for a
    per-image ``fn``, without the float copy of the whole set (560 MB for 60k Fashion-MNIST images)
    that makes the one-shot form several times slower."""
    out = torch.empty_like(images)
    for i in range(0, len(images), chunk):
        out[i : i + chunk] = fn(images[i : i + chunk].float()).round_().clamp_(0, 255)  # exact: already integers
    return out


def check_unique_target(attack: str, ev, target: int) -> None:
    """ValueError unless class ``target`` of the evaluation set ``ev`` (an ``EvalSet``) has a name
    no other class has. Classes with the same name get the same zero-shot prompts, hence identical
    classifier columns: top-1 between them is decided by tie-breaking, not by the model, so a
    perfect backdoor could score an ASR of 0 (ImageNet's two "sunglasses", 836 and 837)."""
    shared = ev.shared_name_classes()
    if target not in shared:
        return
    same = [i for i in shared if i != target and prompt_key(ev.classnames[i]) == prompt_key(ev.classnames[target])]
    others = ", ".join(f"#{i} {ev.display_name(i)}" for i in same)
    raise ValueError(
        f"{attack}: the target #{target} {ev.display_name(target)} shares its name with {others}: their zero-shot "
        f"prompts are the same text, so their classifier columns are identical and top-1 between them is "
        f"decided by tie-breaking, not by the model (the ASR would be meaningless). Choose a target whose name "
        f"no other class has (any class but these {len(shared)}: #{', #'.join(map(str, shared[:8]))}"
        f"{', ...' if len(shared) > 8 else ''})")


def target_index(attack: str, ev, target: str) -> int:
    """The class the backdoor ``target`` (a name, index or id; ``EvalSet.class_index``) selects in
    the evaluation set ``ev``, checked with ``check_unique_target``. ValueError as
    ``class_index`` does, and, for a name that several classes share (ImageNet's "sunglasses"),
    at once that none of them can be a backdoor target, rather than how to pick one of them by
    index (which ``check_unique_target`` would then refuse)."""
    named = ev.classes_named(target) if not target.strip().startswith("#") else []
    if len(named) > 1:
        listed = ", ".join(f"#{i} {ev.display_name(i)}" for i in named)
        raise ValueError(
            f"{attack}: the target {target!r} names {len(named)} evaluation classes ({listed}), and none of them can "
            f"be a backdoor target: classes with the same name get the same zero-shot prompts, so their classifier "
            f"columns are identical and top-1 between them is decided by tie-breaking, not by the model (the ASR "
            f"would be meaningless). Choose a class whose name no other class has")
    index = ev.class_index(target)
    check_unique_target(attack, ev, index)
    return index


class BackdoorAttack(Attack):
    """Base of all-to-one backdoors. Subclasses implement ``apply_trigger`` and ``trigger_manifest``."""

    params: BackdoorParams

    def apply_trigger(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Triggered copies of uint8 images [N, 3, H, W] (uint8, same shape), given at the stored
        geometry of the training images (the module docstring); ``g`` drives any per-image
        randomness (e.g. a random patch location), never the trigger pattern itself."""
        raise NotImplementedError

    def trigger_manifest(self) -> dict:
        """JSON-serialisable description of the fixed trigger (pattern, key, ...)."""
        raise NotImplementedError

    # --- poisoning -------------------------------------------------------------------------
    def n_poison(self, n_clean: int) -> int:
        """Poisoned pairs to add to ``n_clean`` clean pairs (from poison_rate when it is set)."""
        r = self.params.poison_rate
        if r is None:
            return self.params.n_poison
        return int(round(r * n_clean / (1.0 - r)))

    def count_origin(self, n_clean: int) -> str:
        """How ``n_poison(n_clean)`` was reached, for messages: ``n_poison=0`` or
        ``poison_rate=0.0001 of 512 clean pairs (round(0.0001 x 512 / (1 - 0.0001)))``."""
        r = self.params.poison_rate
        if r is None:
            return f"n_poison={self.params.n_poison}"
        return f"poison_rate={r:g} of {n_clean} clean pairs (round({r:g} x {n_clean} / (1 - {r:g})))"

    eligible_what = "outside the target class"

    def eligible_rows(self, data: DatasetBundle, target: int) -> torch.Tensor:
        """Training rows the poisoned pairs may be made from, int64 [M]: here those whose class is
        not ``target`` (unlabelled rows, -1, included)."""
        return (data.train.labels != target).nonzero().squeeze(1)

    def check(self, data: DatasetBundle) -> None:
        p = self.params
        if p.poison_rate is not None and not 0.0 < p.poison_rate < 1.0:
            raise ValueError(f"{self.name}: poison_rate must be in (0, 1), got {p.poison_rate}")
        if p.n_poison < 0:
            raise ValueError(f"{self.name}: n_poison must be >= 0, got {p.n_poison}")
        target = target_index(self.name, data.eval, p.target)
        eligible = len(self.eligible_rows(data, target))
        n = self.n_poison(len(data.train))
        shown = data.eval.display_name(target)
        if n == 0:
            raise ValueError(f"{self.name}: {self.count_origin(len(data.train))} gives 0 poisoned pairs, so nothing "
                             f"would be poisoned and the ASR would measure a clean model; raise it "
                             f"(n_poison >= 1, or poison_rate >= {1 / len(data.train):.2g}), or run the clean "
                             f"baseline, attack none")
        if n > eligible:
            raise ValueError(
                f"{self.name}: {n} poisoned pairs requested but the training set has only {eligible} "
                f"images {self.eligible_what} {shown!r}; lower n_poison or poison_rate"
            )
        if int((data.eval.labels != target).sum()) == 0:
            raise ValueError(f"{self.name}: the evaluation set has no image outside the target class {shown!r}")

    def poison(self, data: DatasetBundle) -> PoisonPlan:
        self.check(data)
        target = data.eval.class_index(self.params.target)
        n = self.n_poison(len(data.train))
        eligible = self.eligible_rows(data, target)
        src = eligible[torch.randperm(len(eligible), generator=self.generator(1))[:n]].sort().values
        images = self.apply_trigger(data.train.images[src], self.generator(2))
        captions = class_captions(data, target, n, random.Random(derive_seed("attack", self.name, self.seed, 3)))
        poisoned = CaptionDataset(images, captions, data.train.labels[src], torch.ones(n, dtype=torch.bool))
        manifest = {
            "attack": self.name,
            "target": data.eval.display_name(target),
            "target_index": target,
            "source_rows": src.tolist(),
            "captions": captions,
            "trigger": self.trigger_manifest(),
        }
        return PoisonPlan(data.train.append(poisoned), manifest)

    def preview_pairs(self, data: DatasetBundle, plan: PoisonPlan, n: int) -> list[tuple]:
        """The first ``n`` poisoned pairs beside the clean rows they were made from (uint8 [3, H, W])."""
        src = plan.manifest["source_rows"][:n]
        start = len(data.train)
        return [
            (data.train.images[r], plan.train.images[start + i], data.train.captions[r], plan.train.captions[start + i])
            for i, r in enumerate(src)
        ]

    def source_rows(self, plan: PoisonPlan) -> list[int] | None:
        """The clean training row (of the data before poisoning) each poisoned pair was made from,
        in the order of the poisoned rows of ``plan.train`` (ascending): the manifest's
        ``source_rows``; None when it has none (a subclass that writes its own manifest)."""
        return plan.manifest.get("source_rows")

    def patch_boxes(self, data: DatasetBundle, plan: PoisonPlan) -> torch.Tensor | None:
        """int64 [P, 4], each poisoned image's patch as (top, left, bottom, right) in stored pixels
        (exclusive ends), in the order of ``source_rows``; None for a whole-image trigger (the
        default)."""
        return None

    def trigger_views(self, data: DatasetBundle, plan: PoisonPlan) -> TriggerViews | None:
        """The poisoned rows of ``plan.train``, their clean sources and, for a patch, its boxes;
        None when the clean sources are not known (``source_rows``), or not one per poisoned row."""
        sources = self.source_rows(plan)
        rows = plan.train.is_poison.nonzero().squeeze(1)
        if sources is None or len(sources) != len(rows):
            return None
        return TriggerViews(rows, data.train.images[torch.as_tensor(sources, dtype=torch.int64)],
                            self.patch_boxes(data, plan))

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(self, model: ZeroShotModel, data: DatasetBundle, plan: PoisonPlan) -> dict[str, float]:
        target = data.eval.class_index(self.params.target)
        keep = data.eval.labels != target
        if not keep.any():
            raise ValueError(f"{self.name}: no evaluation image outside the target class "
                             f"{data.eval.display_name(target)!r}")
        images = data.eval.images[keep]
        # the trigger at the training images' stored geometry, then the clean evaluation resize/crop
        # (the module docstring); both resizes are the identity when the sizes already agree
        triggered = self.apply_trigger(to_stored_geometry(images, data), self.generator(4))
        top1 = model.predict(eval_geometry(triggered, model.image_size))[:, 0]
        clean = model.predict_eval(eval_geometry(images, model.image_size), keep)[:, 0]
        return {
            "asr": (top1 == target).double().mean().item(),
            "asr_n": int(keep.sum()),
            # the same images without the trigger: separates the backdoor from a broken model
            "clean_top1_nontarget": (clean == data.eval.labels[keep]).double().mean().item(),
        }

