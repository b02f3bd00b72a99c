"""BadCLIP (Liang et al., CVPR 2024, "BadCLIP: Dual-Embedding Guided Backdoor Attack on Multimodal
Contrastive Learning"): a centre patch optimised against a surrogate CLIP so that triggered images
embed near the target's captions and images, then pasted on random training rows whose captions are
replaced by natural target captions. Implemented from ../shared/reference/spec-badclip-density-
detection.md Part A; the optimisation is ``badclip_trigger``.

Faithful to the official code (its README recipe and the run that produced the released trigger):
objective L_it + 500 L_tri with margin 1 and the in-place "negatives" (§A.5, Q1); Adam at 1e-3 on a
N(0.5, 0.25) patch, batch 64, 50 epochs over 10,000 images of non-target rows paired with target
captions (§A.4, §A.6); AutoAugment on half the batches; no text augmentation (Q2); the trigger saved
with R and B swapped and JPEG-compressed (Q3); poisons *replace* random rows (any class) and take
their captions from a pool of 128 target captions (§A.8). Departures are parameters: ``patch_size``
(scaled to the image), ``opt_images`` / ``opt_epochs`` (a profile's budget), ``negatives``,
``deploy``. What the official code leaves unseeded (Q10) is seeded here.

ASR: ``asr`` is the benchmark's backdoor protocol (attacks/backdoor.py: triggered evaluation images
outside the target class), so it compares with every other backdoor; ``asr_paper`` is the paper's
(§A.10, Q7: every evaluation image, the target class included).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from poisonbench.datasets.base import CaptionDataset, DatasetBundle
from poisonbench.init_spec import parse_init
from poisonbench.preprocess import eval_geometry
from poisonbench.registry import param, register_attack
from poisonbench.utils import derive_seed

from .backdoor import BackdoorAttack, BackdoorParams, target_index
from .badclip_trigger import Objective, centre_offset, deploy, optimise_trigger, paste_centre
from .base import AttackContext, PoisonPlan, ZeroShotModel, class_caption_rows, to_stored_geometry


@dataclass
class BadCLIPParams(BackdoorParams):
    n_poison: int = param(100, "training rows replaced by poisoned pairs (the paper: 1,500 of 500,000)")
    poison_rate: Optional[float] = param(None, "poisoned rows / all training rows, in (0, 1); overrides n_poison")
    patch_size: int = param(0, "side of the square trigger in pixels of the stored image; 0 = the paper's 16 px "
                               "at 224 scaled to the image (2 px at 28), at least 1")
    surrogate: str = param("clean", "the model the trigger is optimised against, of the cell's architecture (--model), "
                                    "as an --init spec: clean (the profile's clean model), pretrained:RN50/openai (the "
                                    "paper's, with --model RN50) or checkpoint:/absolute/path")
    opt_images: int = param(10000, "patch-training images: non-target training rows, each paired with a target "
                                   "caption (the paper: 10,000)")
    opt_epochs: int = param(50, "optimisation epochs over the patch-training images (the paper: 50)")
    opt_batch_size: int = param(64, "optimisation batch (the paper: 64, last partial batch dropped)")
    opt_lr: float = param(1e-3, "Adam learning rate of the trigger (the code's default; --lr is unused there)")
    triplet_weight: float = param(500.0, "weight of the visual triplet term (the released trigger: 500)")
    margin: float = param(1.0, "triplet margin (the released trigger: 1.0)")
    negatives: Literal["faithful_inplace", "intended_clean"] = param(
        "faithful_inplace", "triplet negatives: faithful_inplace (the code: triggered embeddings of other batch "
                            "images) or intended_clean (their clean embeddings, the paper's figure)")
    aug_prob: float = param(0.5, "chance per optimisation batch that all its images are AutoAugmented")
    caption_pool: int = param(128, "distinct target captions the poisoned captions are drawn from (the paper: 128 "
                                   "drawn with replacement from its banana captions)")
    deploy: Literal["jpeg_bgr", "exact"] = param(
        "jpeg_bgr", "how the optimised patch becomes the trigger: jpeg_bgr (the code: saved by OpenCV, R and B "
                    "swapped, JPEG) or exact (the optimised pixels)")


@register_attack("badclip")
class BadCLIP(BackdoorAttack):
    """BadCLIP (Liang et al., CVPR 2024): a centre patch optimised against a surrogate CLIP (by
    default the profile's clean model), pasted on random training rows that it replaces, with
    target captions. Before training, the checks see a grey placeholder on the same rows."""

    Params = BadCLIPParams
    eligible_what = "(of any class) for the target"

    def __init__(self, params: BadCLIPParams, seed: int):
        super().__init__(params, seed)
        p = params
        for name in ("opt_images", "opt_epochs", "opt_batch_size", "caption_pool"):
            if getattr(p, name) < 1:
                raise ValueError(f"badclip: {name} must be >= 1, got {getattr(p, name)}")
        if p.patch_size < 0 or not p.opt_lr > 0 or not 0 <= p.aug_prob <= 1 or p.triplet_weight < 0 or p.margin < 0:
            raise ValueError("badclip: patch_size >= 0, opt_lr > 0, aug_prob in [0, 1], triplet_weight >= 0 and "
                             "margin >= 0 are required")
        kind, arg = parse_init(p.surrogate)  # ValueError naming the valid forms
        if kind == "scratch":
            raise ValueError("badclip: surrogate=scratch is an untrained model; give clean (the profile's clean model), "
                             "pretrained:ARCH/TAG or checkpoint:PATH")
        if kind == "checkpoint" and not Path(arg).is_absolute():
            raise ValueError(f"badclip: surrogate=checkpoint:{arg}: give the file's absolute path (a relative one "
                             "would name another file, and another cached trigger, from another folder)")
        self.trigger = None  # uint8 [3, s, s] once poison() has made or placed it

    def model_init(self) -> str:
        return self.params.surrogate

    def side(self, data: DatasetBundle) -> int:
        """The trigger's side in pixels of the stored training images."""
        s = int(data.train.images.shape[-1])
        return self.params.patch_size or max(1, round(16 * s / 224))

    def n_poison(self, n_clean: int) -> int:
        """Rows to replace: ``n_poison``, or round(poison_rate x rows) (poisons replace rows, §A.8)."""
        r = self.params.poison_rate
        return self.params.n_poison if r is None else int(round(r * n_clean))

    def eligible_rows(self, data: DatasetBundle, target: int) -> torch.Tensor:
        """Every training row may be poisoned (§A.8: random rows of the whole set)."""
        return torch.arange(len(data.train))

    def check(self, data: DatasetBundle) -> None:
        super().check(data)
        target = target_index(self.name, data.eval, self.params.target)
        h = int(data.train.images.shape[-1])
        if self.side(data) > h:
            raise ValueError(f"badclip: patch_size {self.side(data)} does not fit in {h} px training images")
        n_images = min(self.params.opt_images, len(data.train) - len(class_caption_rows(data, target)))
        if n_images < self.params.opt_batch_size:
            raise ValueError(f"badclip: {n_images} patch-training images (opt_images, non-target rows) are fewer than "
                             f"one optimisation batch ({self.params.opt_batch_size}); raise opt_images or lower "
                             "opt_batch_size")
        if len(class_caption_rows(data, target)) < self.params.opt_batch_size:
            raise ValueError(f"badclip: {len(class_caption_rows(data, target))} training captions name the target "
                             f"{data.eval.display_name(target)!r}; the optimisation's positives and captions need at "
                             f"least one batch ({self.params.opt_batch_size}); lower opt_batch_size")

    # --- the trigger -----------------------------------------------------------------------
    def optimisation_params(self, data: DatasetBundle) -> dict:
        """The parameters the optimised patch depends on (its cache key): not the poison count,
        the caption pool or how the patch is deployed."""
        p = self.params
        keys = ("target", "surrogate", "opt_images", "opt_epochs", "opt_batch_size", "opt_lr", "triplet_weight",
                "margin", "negatives", "aug_prob")
        return {"side": self.side(data), **{k: getattr(p, k) for k in keys}}

    def optimise(self, data: DatasetBundle, context: AttackContext) -> dict[str, torch.Tensor]:
        """The optimised patch against ``context``'s surrogate (``badclip_trigger.optimise_trigger``):
        {"patch": float [3, s, s] in [0, 1], "losses": float [2, 3] (first, last step: img_text,
        triplet, loss), "steps": int64 []}."""
        from poisonbench.evaluate import encode_images, encode_texts
        from poisonbench.models import image_size

        p, g = self.params, self.generator(5)
        target = data.eval.class_index(p.target)
        model, tokenizer = context.surrogate()
        size = image_size(model)
        target_rows = class_caption_rows(data, target)
        others = torch.tensor(sorted(set(range(len(data.train))) - set(target_rows)), dtype=torch.int64)
        rows = others[torch.randperm(len(others), generator=g)[: p.opt_images]]
        rng = random.Random(derive_seed("attack", self.name, self.seed, 6))
        captions = [data.train.captions[rng.choice(target_rows)] for _ in rows]  # with replacement (§A.4)
        images = data.train.images[rows]
        text_emb = encode_texts(model, tokenizer, captions, device=context.device)
        pos = data.train.images[torch.tensor(target_rows)]
        pos_emb = encode_images(model, eval_geometry(pos, size), device=context.device)
        patch, record = optimise_trigger(
            model, size, images, text_emb, pos_emb, self.side(data), Objective(p.triplet_weight, p.margin, p.negatives),
            p.opt_epochs, p.opt_batch_size, p.opt_lr, p.aug_prob, g, context.device)
        keys = ("img_text", "triplet", "loss")
        losses = torch.tensor([[record[w][k] for k in keys] for w in ("first_loss", "last_loss")])
        return {"patch": patch, "losses": losses, "steps": torch.tensor(record["steps"])}

    # --- poisoning -------------------------------------------------------------------------
    def poison(self, data: DatasetBundle, context: AttackContext | None = None) -> PoisonPlan:
        self.check(data)
        p = self.params
        target = data.eval.class_index(p.target)
        s = self.side(data)
        if context is None:
            found, self.trigger = None, torch.full((3, s, s), 128, dtype=torch.uint8)
        else:
            found = context.cached("trigger", lambda: self.optimise(data, context), self.optimisation_params(data))
            self.trigger = deploy(found["patch"], p.deploy)
        n = self.n_poison(len(data.train))
        src = torch.randperm(len(data.train), generator=self.generator(1))[:n].sort().values
        rng = random.Random(derive_seed("attack", self.name, self.seed, 3))
        target_rows = class_caption_rows(data, target)
        pool = [data.train.captions[rng.choice(target_rows)] for _ in range(p.caption_pool)]  # §A.8
        captions = [rng.choice(pool) for _ in range(n)]
        images = paste_centre(data.train.images[src], self.trigger)
        poisoned = CaptionDataset(images, captions, data.train.labels[src], torch.ones(n, dtype=torch.bool))
        keep = torch.ones(len(data.train), dtype=torch.bool)
        keep[src] = False  # the poisoned rows' clean originals are dropped (§A.8)
        manifest = {
            "attack": self.name,
            "target": data.eval.display_name(target),
            "target_index": target,
            "source_rows": src.tolist(),
            "replaces_rows": True,
            "captions": captions,
            "trigger": self.trigger_manifest(found),
        }
        return PoisonPlan(data.train.subset(keep.nonzero().squeeze(1)).append(poisoned), manifest)

    def trigger_manifest(self, found: dict | None = None) -> dict:
        out = {"pixels": self.trigger.tolist(), "position": "centre", "deploy": self.params.deploy}
        if found is None:
            out["optimised"] = False  # the grey placeholder of the checks made before training
            return out
        first, last = found["losses"].tolist()
        out.update(optimised=True, steps=int(found["steps"]), patch=[round(v, 6) for v in found["patch"].flatten().tolist()],
                   first_loss=dict(zip(("img_text", "triplet", "loss"), first)),
                   last_loss=dict(zip(("img_text", "triplet", "loss"), last)))
        return out

    def apply_trigger(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return paste_centre(images, self.trigger)

    def patch_boxes(self, data: DatasetBundle, plan: PoisonPlan) -> torch.Tensor:
        """The centre patch of every poisoned image (``paste_centre``)."""
        h, w = data.train.images.shape[-2:]
        s = self.side(data)
        r, c = centre_offset(int(h), s), centre_offset(int(w), s)
        return torch.tensor([[r, c, r + s, c + s]], dtype=torch.int64).expand(len(self.source_rows(plan)), 4)

    def preview_pairs(self, data: DatasetBundle, plan: PoisonPlan, n: int) -> list[tuple]:
        """The first ``n`` poisoned pairs beside the clean rows they replaced (uint8 [3, H, W])."""
        src = plan.manifest["source_rows"][:n]
        start = len(plan.train) - len(plan.manifest["source_rows"])
        return [(data.train.images[r], plan.train.images[start + i], data.train.captions[r], plan.train.captions[start + i])
                for i, r in enumerate(src)]

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(self, model: ZeroShotModel, data: DatasetBundle, plan: PoisonPlan) -> dict[str, float]:
        """``asr`` etc. as every backdoor (``BackdoorAttack.evaluate``), and ``asr_paper``: the share
        of all triggered evaluation images, the target class included, predicted as the target
        (§A.10, Q7)."""
        self.trigger = torch.tensor(plan.manifest["trigger"]["pixels"], dtype=torch.uint8)
        out = super().evaluate(model, data, plan)
        target = data.eval.class_index(self.params.target)
        # the non-target images are scored by ``asr`` already: predict only the target class's
        own = data.eval.labels == target
        hits = 0
        if own.any():
            triggered = self.apply_trigger(to_stored_geometry(data.eval.images[own], data), None)
            hits = int((model.predict(eval_geometry(triggered, model.image_size))[:, 0] == target).sum())
        out["asr_paper"] = (round(out["asr"] * out["asr_n"]) + hits) / len(data.eval)
        return out
