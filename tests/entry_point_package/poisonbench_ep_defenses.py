"""A third-party package's defenses, one of each kind, reached only through the entry-point group
``poisonbench.defenses`` (tests/test_entry_point_plugins.py installs it with a ``*.dist-info``
folder and runs the conformance suite on it). It uses the public API only: a defense of a new kind
must not need a change to the engine."""
from dataclasses import dataclass

import torch

from poisonbench import register_defense
from poisonbench.defenses import DataFilter, Defense, PhaseSettings, PostTrainingRepair, TrainingTask
from poisonbench.losses import info_nce
from poisonbench.preprocess import eval_geometry, normalize
from poisonbench.registry import param


@dataclass
class TemperatureParams:
    scale: float = param(0.5, "multiplier of the logit scale in the loss, in (0, 1]")


@register_defense("ep-training")
class SoftTemperature(Defense):
    """Training-time: the CLIP loss at a softened temperature."""
    Params = TemperatureParams

    def loss(self, image_emb, text_emb, logit_scale, state):
        return info_nce(image_emb, text_emb, logit_scale * self.params.scale)


@register_defense("ep-task")
class ImageOnlyTask(TrainingTask):
    """Task: owns the forward pass; the CLIP loss and an image-image term on a flipped view."""
    Params = TemperatureParams

    def step(self, model, batch, state):
        x = normalize(eval_geometry(batch.images, batch.image_size).to(batch.device))
        img, txt, scale = model(x, batch.tokens.to(batch.device))
        flipped = model.encode_image(torch.flip(x, dims=[3]), normalize=True)
        return {"clip": info_nce(img, txt, scale), "flip": self.params.scale * info_nce(img, flipped, scale)}


@dataclass
class FilterParams:
    remove_fraction: float = param(0.2, "share of the pairs removed, the lowest image-text similarity first")


@register_defense("ep-filter")
class LowSimilarityFilter(DataFilter):
    """Data filter: a pair whose image and caption embeddings disagree is suspicious."""
    Params = FilterParams

    @torch.no_grad()
    def score(self, model, tokenizer, data, device):
        x = normalize(eval_geometry(data.images, model.visual.image_size).to(device))
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokenizer(list(data.captions)).to(device), normalize=True)
        return -(img * txt).sum(dim=1).cpu()

    def metrics(self):
        return {"n_scored": 1}


@register_defense("ep-repair")
class ShortRepair(PostTrainingRepair):
    """Post-training repair: one epoch of the softened CLIP loss on the clean split."""
    Params = TemperatureParams

    def phase(self, cfg):
        return PhaseSettings(name="repair", epochs=1, lr=cfg.lr / 10, batch_size=32, warmup_steps=1,
                             weight_decay=cfg.weight_decay)

    def training(self):
        return SoftTemperature(self.params, self.seed)
