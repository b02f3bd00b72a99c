"""No attack: the clean baseline (no poisoned pairs, no attack metric)."""
from __future__ import annotations

from dataclasses import dataclass

from poisonbench.registry import register_attack

from .base import CLEAN, Attack, PoisonPlan


@dataclass
class NoParams:
    pass


@register_attack(CLEAN)
class NoAttack(Attack):
    """Trains on the clean data; reports clean accuracy only."""

    Params = NoParams
    poisons = False  # the clean baseline: not an attack, left out of `--attack all`
    seeded = False  # poisons nothing: every seed gives the same (empty) manifest

    def poison(self, data) -> PoisonPlan:
        return PoisonPlan(data.train, {"attack": "none"})

    def evaluate(self, model, data, plan) -> dict[str, float]:
        return {}
