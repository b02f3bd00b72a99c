"""Label-consistent BadNets: the patch is pasted on training images that already belong to the
target class, which keep their own captions (CleanCLIP's ``--label_consistent``; Turner et al.
2019's label-consistent setting without its adversarial perturbation). No caption is changed, so
caption-based filtering cannot see the poison."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from poisonbench.registry import param, register_attack

from .badnet import BadNet, BadNetParams
from .base import PoisonPlan


@dataclass
class BadNetLCParams(BadNetParams):
    n_poison: int = param(100, "number of target-class training images patched in place (captions kept)")
    poison_rate: Optional[float] = param(None, "patched images / all training pairs, in (0, 1); overrides n_poison when set")


@register_attack("badnet-lc")
class BadNetLC(BadNet):
    """Label-consistent BadNets: ``n_poison`` target-class training images are patched in place."""

    Params = BadNetLCParams

    eligible_what = "of the target class"

    def n_poison(self, n_clean: int) -> int:
        """Images to patch among ``n_clean`` pairs: in place, so poison_rate is a share of them all."""
        r = self.params.poison_rate
        return self.params.n_poison if r is None else int(round(r * n_clean))

    def count_origin(self, n_clean: int) -> str:
        r = self.params.poison_rate
        if r is None:
            return f"n_poison={self.params.n_poison}"
        return f"poison_rate={r:g} of {n_clean} pairs (round({r:g} x {n_clean}))"

    def eligible_rows(self, data, target: int) -> torch.Tensor:
        """Rows labelled ``target``, int64 [M]."""
        return (data.train.labels == target).nonzero().squeeze(1)

    def source_rows(self, plan: PoisonPlan) -> list[int]:
        """The patched rows: in place, so each is its own clean source."""
        return plan.manifest["replaced_rows"]

    def preview_pairs(self, data, plan: PoisonPlan, n: int) -> list[tuple]:
        rows = plan.manifest["replaced_rows"][:n]
        return [(data.train.images[r], plan.train.images[r], data.train.captions[r], plan.train.captions[r]) for r in rows]

    def poison(self, data) -> PoisonPlan:
        self.check(data)
        target = data.eval.class_index(self.params.target)
        n = self.n_poison(len(data.train))
        eligible = self.eligible_rows(data, target)
        src = eligible[torch.randperm(len(eligible), generator=self.generator(1))[:n]].sort().values
        train = data.train.subset(torch.arange(len(data.train)))  # a copy; the clean set is left intact
        train.images[src] = self.apply_trigger(train.images[src], self.generator(2))
        train.is_poison[src] = True
        manifest = {
            "attack": self.name,
            "target": data.eval.display_name(target),
            "target_index": target,
            "replaced_rows": src.tolist(),
            "captions": [train.captions[i] for i in src.tolist()],
            "trigger": self.trigger_manifest(),
        }
        return PoisonPlan(train, manifest)
