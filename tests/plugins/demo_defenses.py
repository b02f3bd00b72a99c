"""One defense of each kind, as README.md "Adding a defense" shows them (tests/test_readme_plugins.py
checks the README block equals this file's code): registered when the tests import this module, so
the conformance suite runs each of them end to end."""
from dataclasses import dataclass
import torch
from poisonbench import register_defense
from poisonbench.defenses import DataFilter, Defense, PhaseSettings, PostTrainingRepair, TrainingTask
from poisonbench.losses import info_nce
from poisonbench.preprocess import eval_geometry, normalize
from poisonbench.registry import param

@dataclass
class MyParams:
    strength: float = param(0.5, "how hard to defend, in [0, 1]")

@register_defense("mine")            # training-time: hooks into the one training loop
class Mine(Defense):
    """My defense (Author et al. 2026, §3)."""
    Params = MyParams

    def loss(self, image_emb, text_emb, logit_scale, state):
        return info_nce(image_emb, text_emb, logit_scale)   # scalar; also text_transform, train_transform, start_epoch

@register_defense("my-task")         # task: owns the forward pass, returns named loss terms
class MyTask(TrainingTask):
    Params = MyParams

    def step(self, model, batch, state):          # batch: rows, images uint8 [B,3,H,W], tokens, image_size, device
        x = normalize(eval_geometry(batch.images, batch.image_size).to(batch.device))
        img, txt, scale = model(x, batch.tokens.to(batch.device))
        return {"clip": info_nce(img, txt, scale)}  # summed by the trainer, each logged as final_loss_<term>

@dataclass
class FilterParams:
    remove_fraction: float = param(0.1, "share of the most suspicious pairs removed")

@register_defense("my-filter")       # data filter: scores pairs with the cached undefended model
class MyFilter(DataFilter):
    Params = FilterParams

    @torch.no_grad()
    def score(self, model, tokenizer, data, device):  # float [N], higher = more suspicious
        x = normalize(eval_geometry(data.images, model.visual.image_size).to(device))
        return -model.encode_image(x).norm(dim=1).cpu()  # default keep(): drops remove_fraction

@register_defense("my-repair")       # post-training repair: fine-tunes the cached undefended model
class MyRepair(PostTrainingRepair):
    Params = MyParams

    def phase(self, cfg):
        return PhaseSettings(name="repair", epochs=5, lr=1e-5, batch_size=64, warmup_steps=10,
                             weight_decay=cfg.weight_decay)

    def training(self):
        return MyTask(self.params, self.seed)      # any training-time or task defense
