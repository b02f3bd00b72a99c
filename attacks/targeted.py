"""Targeted data poisoning (Carlini & Terzis, ICLR 2022, §4; as used by RoCLIP, arXiv:2303.06854 §5.1).

``n_targets`` images are drawn from the evaluation split; each gets an adversarial class different
from its true class (never a class whose name another class shares: see ``choose_targets``), and
``pairs_per_target`` pairs (target image, caption naming the adversarial class) are appended to the
training set. The captions are real training captions that name the
class when there are any, templates otherwise (docs/roclip-spec.md §3.1, the authors'
``create_poison.ipynb``). The target images are not otherwise in the training data; in the pairs
they are at the stored geometry of the training images (``base.to_stored_geometry``, the rule of
attacks/backdoor.py), so they go through the training pixel pipeline as any training image.

ASR (docs/DESIGN.md, "Targeted-poisoning ASR"): each target image, clean and at the evaluation
geometry, succeeds when its zero-shot top-1 is its adversarial class; ASR = successes / n_targets.
"""
from __future__ import annotations

import dataclasses

import random
from dataclasses import dataclass
from typing import Any

import torch

from poisonbench.datasets.base import CaptionDataset, CaptionSearch, DatasetBundle
from poisonbench.preprocess import eval_geometry
from poisonbench.registry import param, register_attack
from poisonbench.utils import derive_seed

from .base import Attack, PoisonPlan, ZeroShotModel, class_caption_rows, class_captions, to_stored_geometry


@dataclass
class TargetedParams:
    n_targets: int = param(16, "target images drawn from the evaluation split (ASR granularity 1/n_targets)")
    pairs_per_target: int = param(100, "poisoned pairs per target image (the RoCLIP authors' code uses 100)")


@register_attack("targeted")
class Targeted(Attack):
    """Targeted poisoning: make the model put chosen evaluation images in a wrong, chosen class."""

    Params = TargetedParams

    def check(self, data: DatasetBundle) -> None:
        p, n_eval, n_classes = self.params, len(data.eval), len(data.eval.classnames)
        if not 1 <= p.n_targets <= n_eval:
            raise ValueError(f"targeted: n_targets must be in [1, {n_eval}] (the evaluation set's size), got {p.n_targets}")
        if p.pairs_per_target < 1:
            raise ValueError(f"targeted: pairs_per_target must be >= 1, got {p.pairs_per_target}")
        total = p.n_targets * p.pairs_per_target
        if total > len(data.train):
            raise ValueError(
                f"targeted: {p.n_targets} targets x {p.pairs_per_target} pairs = {total} poisoned pairs, more than "
                f"the {len(data.train)} clean training pairs; lower pairs_per_target or n_targets"
            )
        if n_classes < 2:
            raise ValueError(f"targeted: needs at least 2 evaluation classes to pick a wrong one, got {n_classes}")
        if n_classes - len(data.eval.shared_name_classes()) < 2:
            raise ValueError("targeted: needs at least 2 evaluation classes with a name no other class has "
                             "(adversarial classes are drawn among them); give the classes distinct names")

    def choose_targets(self, data: DatasetBundle) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded target rows of the evaluation split and their adversarial classes.

        Returns:
            (rows, adversarial): int64 [n_targets] each; rows are distinct, and
            ``adversarial[i] != data.eval.labels[rows[i]]``, drawn uniformly from the other classes
            whose name no other class shares (``EvalSet.shared_name_classes``). Such a class has
            the same zero-shot column as its namesake, so it could not be told apart from it (true
            class 744 "missile", adversarial 657 "missile": a clean model would "succeed" or fail
            by tie-breaking). When every name is unique (Fashion-MNIST) the draw is the plain one
            and nothing is redrawn, so existing runs keep their targets.
        """
        g = self.generator(1)
        rows = torch.randperm(len(data.eval), generator=g)[: self.params.n_targets]
        true = data.eval.labels[rows]
        # an offset in 1..C-1 modulo C is uniform over the C-1 classes other than the true one
        n_classes = len(data.eval.classnames)
        offset = torch.randint(1, n_classes, (len(rows),), generator=g)
        adversarial = (true + offset) % n_classes
        shared = torch.tensor(data.eval.shared_name_classes(), dtype=torch.int64)
        if len(shared):  # rejection sampling: redraw the excluded ones from the same generator
            bad = torch.isin(adversarial, shared)
            while bad.any():
                offset = torch.randint(1, n_classes, (int(bad.sum()),), generator=g)
                adversarial[bad] = (true[bad] + offset) % n_classes
                bad = torch.isin(adversarial, shared)
        return rows, adversarial

    def poison(self, data: DatasetBundle) -> PoisonPlan:
        self.check(data)
        rows, adversarial = self.choose_targets(data)
        k = self.params.pairs_per_target
        images = to_stored_geometry(data.eval.images[rows], data)  # identity for every built-in dataset
        rng = random.Random(derive_seed("attack", self.name, self.seed, 2))
        search = CaptionSearch(data.train.captions)  # indexed once for every adversarial class
        rows_of = {a: class_caption_rows(data, a, search) for a in set(adversarial.tolist())}
        captions = [c for a in adversarial.tolist() for c in class_captions(data, a, k, rng, rows_of[a])]
        poisoned = CaptionDataset(
            images.repeat_interleave(k, dim=0), captions,
            data.eval.labels[rows].repeat_interleave(k), torch.ones(len(rows) * k, dtype=torch.bool),
        )
        shown = data.eval.display_name
        manifest = {
            "attack": self.name,
            # classes by index (what evaluation uses); the names, disambiguated, are for people
            "targets": [
                {"eval_row": r, "true_class": shown(t), "adversarial_class": shown(a), "true_index": t,
                 "adversarial_index": a}
                for r, t, a in zip(rows.tolist(), data.eval.labels[rows].tolist(), adversarial.tolist())
            ],
            "pairs_per_target": k,
            "captions": captions,
        }
        return PoisonPlan(data.train.append(poisoned), manifest)

    def evaluate(self, model: ZeroShotModel, data: DatasetBundle, plan: PoisonPlan) -> dict[str, Any]:
        """``asr`` (top-1 == adversarial class, over targets), ``asr_top5``, ``asr_n`` and
        ``targets``: one record per target (eval row; true, adversarial and predicted class, each
        as a display name and an index; success), stored in the result row as a list of structs.
        Classes are compared by index (the manifest's ``adversarial_index``), never by name."""
        targets = plan.manifest["targets"]
        rows = torch.tensor([t["eval_row"] for t in targets])
        adversarial = torch.tensor([t["adversarial_index"] for t in targets], dtype=torch.int64)
        top5 = model.predict_eval(eval_geometry(data.eval.images[rows], model.image_size), rows)
        success = top5[:, 0] == adversarial
        records = [
            {**t, "predicted_class": data.eval.display_name(p), "predicted_index": p, "success": bool(s)}
            for t, p, s in zip(targets, top5[:, 0].tolist(), success.tolist())
        ]
        return {
            "asr": success.double().mean().item(),
            "asr_top5": (top5 == adversarial[:, None]).any(1).double().mean().item(),
            "asr_n": len(targets),
            "targets": records,
        }

    def evaluate_subset(self, model: ZeroShotModel, data: DatasetBundle, plan: PoisonPlan, rows) -> dict[str, Any]:
        """All the targets (a few images: cheap), whatever ``rows``; predicted afresh, since the
        model's ``clean_top5`` holds the subset's predictions, not the whole set's."""
        return self.evaluate(dataclasses.replace(model, clean_top5=None), data, plan)

    def preview_pairs(self, data: DatasetBundle, plan: PoisonPlan, n: int) -> list[tuple]:
        """Each target image (poisoned pairs keep it unchanged) with its true class and its first
        poisoned caption."""
        k, start = plan.manifest["pairs_per_target"], len(data.train)
        out = []
        for i, t in enumerate(plan.manifest["targets"][:n]):
            j = start + i * k
            out.append((plan.train.images[j], plan.train.images[j],
                        f"target image, true class: {t['true_class']}",
                        f"{plan.train.captions[j]} (adversarial class: {t['adversarial_class']})"))
        return out
