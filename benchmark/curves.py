"""Per-epoch curves (issue 17): after every training epoch, clean zero-shot top-1 and the attack's
ASR on a fixed, seeded subset of the evaluation set, and the trigger survival of the epoch's
poisoned views (``survival``); stored in the cell's row as lists, one value per epoch.

The subset is the same for every cell of a seed (``curve_rows``), so curves of defenses compare
point by point. Its size is the profile's ``curve_n`` (0: no curves). Evaluating draws no random
number from torch's global RNG, so a cell trains exactly as without curves.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .attacks.base import ZeroShotModel
from .evaluate import encode_images, encode_texts, predict, topk_accuracy, topk_classes, zero_shot_classifier
from .models import image_size
from .preprocess import eval_geometry
from .survival import TriggerSurvival, survival_columns
from .utils import derive_seed


def curve_rows(n_eval: int, n: int, seed: int) -> torch.Tensor:
    """int64 [min(n, n_eval)], ascending: the evaluation rows of the curves of ``seed``'s cells."""
    g = torch.Generator().manual_seed(derive_seed(seed, "curve-rows"))
    return torch.randperm(n_eval, generator=g)[: min(n, n_eval)].sort().values


def zero_shot_model(model, tokenizer, ev, device, clean_top5: torch.Tensor | None = None) -> ZeroShotModel:
    """The ``ZeroShotModel`` an attack's ``evaluate`` gets for ``model`` on evaluation set ``ev``
    (its classifier from ``ev``'s class names and templates)."""
    classifier = zero_shot_classifier(model, tokenizer, ev.classnames, ev.templates, device)
    return ZeroShotModel(lambda images: predict(model, images, classifier, k=5, device=device), image_size(model),
                         clean_top5=clean_top5, classifier=classifier,
                         encode_images=lambda images: encode_images(model, images, device=device),
                         encode_texts=lambda texts: encode_texts(model, tokenizer, texts, device=device))


def epoch_metrics(cell, tokenizer, n: int, probe: TriggerSurvival | None = None) -> Callable | None:
    """The ``train.train(epoch_metrics=...)`` of ``cell`` (a ``runner.Cell``): a function
    (epoch, model) -> {"clean_top1", "asr" (absent for the clean baseline), the survival probe's
    counts of the epoch}; None when ``n`` is 0 and there is no probe."""
    if n <= 0 and probe is None:
        return None
    rows = curve_rows(len(cell.data.eval), n, cell.cfg.seed) if n > 0 else None

    def measure(epoch: int, model) -> dict[str, Any]:
        out: dict[str, Any] = probe.take_epoch() if probe is not None else {}
        if rows is None:
            return out
        ev = cell.data.eval
        zs = zero_shot_model(model, tokenizer, ev, cell.device)
        images = eval_geometry(ev.images[rows], zs.image_size)
        # the subset's clean predictions once: the attack's evaluation indexes them (ZeroShotModel.predict_eval)
        zs.clean_top5 = topk_classes(encode_images(model, images, device=cell.device), zs.classifier, 5)
        out["clean_top1"] = topk_accuracy(zs.clean_top5, ev.labels[rows], 1)
        if cell.attack.poisons:
            asr = cell.attack.evaluate_subset(zs, cell.data, cell.plan, rows).get("asr")
            if asr is not None:
                out["asr"] = float(asr)
        return out

    return measure


def curve_columns(history: list[dict], n: int) -> dict[str, Any]:
    """The row's curve columns from ``train``'s history: ``curve_epoch`` (int list),
    ``curve_clean_top1`` and ``curve_asr`` (fractions, one per epoch), ``curve_n`` (the subset's
    size: ``n`` capped at the evaluation set's), and the survival columns (``survival.survival_columns``); nothing for an empty history."""
    out: dict[str, Any] = {}
    curve = [h for h in history if "clean_top1" in h]
    if curve:
        out.update(curve_epoch=[int(h["epoch"]) for h in curve], curve_clean_top1=[float(h["clean_top1"]) for h in curve],
                   curve_n=n)
        if all("asr" in h for h in curve):
            out["curve_asr"] = [float(h["asr"]) for h in curve]
    out.update(survival_columns(history))
    return out
