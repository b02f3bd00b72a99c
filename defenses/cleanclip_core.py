"""CleanCLIP's pieces (Bansal et al., ICCV 2023), free of the engine's defense kinds: the loss, the
two views, the fine-tuning schedule and the restore of the poisoned checkpoint's optimizer state.

Spec: /work/shared/reference/defense-spec-cleanclip-safeclip.md §2 (tagged [CC] there:
nishadsinghi/CleanCLIP @ d6e2f1db), testable properties §5 C1-C10, decisions §6. The plugin class
that the engine runs (``defenses/cleanclip.py``) is built from these; tests/test_cleanclip.py
checks each property on this module.

Departures from the official code, each kept deliberately:

- DDP gather (§2.3 "DDP"): the official code all-gathers the four embedding sets without
  gradient and puts each rank's own slice back, so every rank computes the loss of the global
  batch but its gradient reaches only its own rows; after DDP's average the step uses the
  full-batch gradient divided by W. Here the gather is ``distributed.gather_with_grad``
  (open_clip's ``gather_with_grad=True``), the one every defense of the trainer uses: the loss
  values are the same (C6: every rank's loss equals the one-process loss of the concatenated
  batch) and the step uses the full-batch gradient itself, i.e. a W-process cell steps as a
  one-process run of the global batch does, which is the README's single-GPU recipe. The two
  differ by the constant factor W on every gradient, which AdamW ignores except against its
  eps = 1e-8 (and the optimizer moments restored from the undefended model were accumulated with
  the same gather at the same W, so they are on the same scale).
- Augmented image (§2.2): the official dataset re-opens the image file and runs AutoAugment on the
  full-resolution PIL image. Here AutoAugment runs on the stored uint8 tensor (the dataset's own
  resolution, before the model's resize/crop, as there), with torchvision's tensor kernels, and
  its randomness comes from torch's global RNG, which the trainer seeds per (seed, epoch, rank):
  a resumed run repeats the views of the uninterrupted one.
- EDA (§2.2): ``poisonbench.augment.eda`` with alpha 0.1 for the four operations and one rewrite
  per caption, seeded by the caller instead of ``random.seed(1)`` at import; a caption without any
  a-z word is kept as it is (the official EDA crashes on it).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from poisonbench import distributed
from poisonbench.augment import eda_captions
from poisonbench.preprocess import eval_geometry, normalize

# CleanCLIP's EDA call: eda(sentence, alpha_sr=0.1, alpha_ri=0.1, alpha_rs=0.1, p_rd=0.1, num_aug=1)
# [CC utils/augment_text.py, utils/eda.py:170]; spec §2.2.
EDA_ALPHA = 0.1

# AdamW settings of the official parser (spec §2.4: betas 0.9/0.999, eps 1e-8).
BETAS = (0.9, 0.999)
EPS = 1e-8

Schedule = Literal["intended", "as-run"]
SCHEDULES = ("intended", "as-run")


def _ce_diagonal(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of N x N ``logits`` with targets arange(N) (row i's positive is column i)."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def cleanclip_losses(
    image: torch.Tensor,
    text: torch.Tensor,
    image_aug: torch.Tensor,
    text_aug: torch.Tensor,
    logit_scale_exp: torch.Tensor,
    clip_weight: float = 1.0,
    inmodal_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """CleanCLIP's objective as run (spec §2.3; [CC] src/train.py:56-71), as two named terms.

    With I, T the L2-normalised embeddings of the original images and captions, Ĩ, T̃ those of
    the augmented images and EDA captions (row i of each belongs to pair i), s = exp(logit_scale)
    and CE the mean cross-entropy with targets arange(N):

    - ``"clip"`` = clip_weight · ½[CE(s·I Tᵀ) + CE(s·T Iᵀ)]  (the standard symmetric CLIP loss);
    - ``"inmodal"`` = inmodal_weight · ½[CE(s·I Ĩᵀ) + CE(s·T T̃ᵀ)]: rows un-augmented, columns
      augmented, one direction only; each row's negatives are the other N-1 augmented views (an
      N x N matrix, not SimCLR's 2N x 2N).

    Their sum is the official loss. The one scalar ``s`` multiplies all four logit matrices and
    gets gradient from both terms. Every input is L2-normalised here (the official model
    normalises in its forward), so any positive rescaling of a feature row changes nothing. In a
    process group the four sets are gathered over ranks with ``distributed.gather_with_grad``
    (see the module docstring for how this relates to the official no-grad gather): every rank
    returns the loss of the global batch of N = W·b pairs.

    Args:
        image, text, image_aug, text_aug: float [b, D] this rank's embeddings (any positive norm).
        logit_scale_exp: scalar tensor s = exp(logit_scale), in [1, 100] after the trainer's clamp.
        clip_weight, inmodal_weight: λ_clip and λ_ss, >= 0 (official defaults 1 and 1).
    Returns:
        {"clip": scalar, "inmodal": scalar}, already weighted, in nats.
    Raises:
        ValueError: inputs of different shapes, or a negative weight.
    """
    shapes = {tuple(t.shape) for t in (image, text, image_aug, text_aug)}
    if len(shapes) != 1 or image.ndim != 2:
        raise ValueError("cleanclip_losses needs four float [b, D] embeddings of one shape, got "
                         + ", ".join(str(tuple(t.shape)) for t in (image, text, image_aug, text_aug)))
    if clip_weight < 0 or inmodal_weight < 0:
        raise ValueError(f"cleanclip weights must be >= 0, got clip_weight={clip_weight}, inmodal_weight={inmodal_weight}")
    image, text, image_aug, text_aug = (F.normalize(t, dim=-1) for t in (image, text, image_aug, text_aug))
    image, text = distributed.gather_with_grad(image, text)
    image_aug, text_aug = distributed.gather_with_grad(image_aug, text_aug)
    s = logit_scale_exp
    cross = s * image @ text.T
    l_clip = (_ce_diagonal(cross) + _ce_diagonal(cross.T)) / 2
    l_ss = (_ce_diagonal(s * image @ image_aug.T) + _ce_diagonal(s * text @ text_aug.T)) / 2
    return {"clip": clip_weight * l_clip, "inmodal": inmodal_weight * l_ss}


def original_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """CleanCLIP's "original" image view (spec §2.2): resize the shorter side to ``size``
    (bicubic) and centre-crop, no random crop and no flip, i.e. ``preprocess.eval_geometry``.

    Args:
        images: uint8 [B, 3, H, W].
    Returns:
        uint8 [B, 3, size, size] (normalise with ``preprocess.normalize``).
    """
    return eval_geometry(images, size)


def autoaugment_view(images: torch.Tensor, size: int, seed: int | None = None) -> torch.Tensor:
    """CleanCLIP's augmented image view (spec §2.2; [CC] utils/augment_image.py): torchvision's
    ``AutoAugment()`` with its defaults (ImageNet policy, nearest interpolation, no fill) applied
    to each image at its stored resolution with a fresh draw per image, then the same resize and
    centre crop as ``original_view``.

    Randomness comes from torch's global RNG (the trainer seeds it per epoch and rank), or, when
    ``seed`` is given, from a generator state seeded with it that leaves the global RNG untouched.

    Args:
        images: uint8 [B, 3, H, W] on any device.
        size: model input side S.
        seed: optional seed for a reproducible call independent of the global RNG.
    Returns:
        uint8 [B, 3, size, size] on the input's device.
    Raises:
        ValueError: images that are not uint8 [B, 3, H, W].
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"autoaugment_view needs uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    policy = v2.AutoAugment()
    if seed is None:
        out = torch.stack([policy(img) for img in images]) if len(images) else images
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = torch.stack([policy(img) for img in images]) if len(images) else images
    return eval_geometry(out, size)


def two_view_forward(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, tokens_aug: torch.Tensor,
                     size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One forward of both views of a batch, as the official code does (spec §2.2; [CC]
    src/train.py:155-160): the original and AutoAugment images are concatenated into one 2B
    batch, and the captions and their EDA rewrites likewise, so a BatchNorm model (RN50 in
    ``model.train()``) mixes the statistics of both views; a LayerNorm ViT gives the original half
    the same embeddings as a forward of it alone (C1).

    Args:
        model: open_clip CLIP (or its DistributedDataParallel wrapper) returning
            (image_emb, text_emb, logit_scale_exp).
        images: uint8 [B, 3, H, W] at the stored resolution (AutoAugment runs on their device).
        tokens, tokens_aug: int64 [B, L] token ids of the captions and of their EDA rewrites.
        size: the model's input side S. device: where the model is.
    Returns:
        (I, T, Ĩ, T̃, s): four float [B, D] embeddings (original images, captions, augmented
        images, EDA captions) and the scalar s = exp(logit_scale).
    """
    b = len(images)
    x = torch.cat([original_view(images, size), autoaugment_view(images, size)])
    image_emb, text_emb, scale = model(normalize(x.to(device)), torch.cat([tokens, tokens_aug]).to(device))
    return image_emb[:b], text_emb[:b], image_emb[b:], text_emb[b:], scale


def text_views(captions: list[str], seed: int) -> list[str]:
    """CleanCLIP's augmented captions (spec §2.2; [CC] src/data.py:36-37): one EDA rewrite per
    caption (one of the four operations drawn per caption, alpha 0.1), computed once and used in
    every epoch; deterministic given ``seed`` and the order of ``captions`` (C7). Needs WordNet
    (``poisonbench.wordnet``; WordNetNotFoundError says how to install it)."""
    return eda_captions(captions, seed, EDA_ALPHA)


def lr_multiplier(step: int, warmup_steps: int, steps_per_epoch: int, epochs: int,
                  schedule: Schedule = "intended") -> float:
    """Multiplier of the peak LR at the trainer's 0-indexed global ``step`` of the fine-tuning
    phase (spec §2.4; [CC] src/scheduler.py, src/train.py:150, src/main.py:162).

    The official schedule is lr·(k+1)/warmup for k < warmup, then ½(1 + cos(π (k - warmup) /
    (total - warmup))) with total = steps_per_epoch · epochs, at the scheduler step k:

    - ``"intended"``: k = step, the schedule as written (warm-up from lr/warmup, cosine to 0 at
      the last step); the progress is clamped at 1 as in ``poisonbench.train.lr_lambda``, which
      this mode equals.
    - ``"as-run"``: k = step + steps_per_epoch, the official code's off-by-one (it numbers epochs
      from 1 and computes k = num_batches·epoch + index): a warm-up shorter than one epoch never
      happens, epoch e runs at the LR meant for epoch e+1, and the last epoch runs past ``total``,
      where the cosine passes π and the LR rises again from 0.

    Raises ValueError for an unknown ``schedule``, steps_per_epoch or epochs < 1, or warmup < 0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown CleanCLIP schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if steps_per_epoch < 1 or epochs < 1 or warmup_steps < 0:
        raise ValueError(f"need steps_per_epoch >= 1, epochs >= 1 and warmup_steps >= 0, got "
                         f"{steps_per_epoch}, {epochs}, {warmup_steps}")
    total = steps_per_epoch * epochs
    k = step + steps_per_epoch if schedule == "as-run" else step
    if k < warmup_steps:
        return (k + 1) / warmup_steps
    progress = (k - warmup_steps) / max(1, total - warmup_steps)
    if schedule == "intended":
        progress = min(1.0, progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(warmup_steps: int, steps_per_epoch: int, epochs: int,
              schedule: Schedule = "intended") -> Callable[[int], float]:
    """``lr_multiplier`` as a function of the step alone, for ``torch.optim.lr_scheduler.LambdaLR``
    (whose base LR is the phase's peak lr). Raises ValueError as ``lr_multiplier`` does."""
    lr_multiplier(0, warmup_steps, steps_per_epoch, epochs, schedule)  # validate now, not at the first step
    return lambda step: lr_multiplier(step, warmup_steps, steps_per_epoch, epochs, schedule)


def restore_optimizer_state_(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load the poisoned model's optimizer ``state`` into ``optimizer`` (spec §2.4, C9; [CC]
    src/main.py:133), in place.

    The per-parameter state (AdamW's moments and step counts of pre-training) is restored, so the
    first fine-tuning update is the official one (bias correction is already negligible); the
    group hyper-parameters (lr, initial_lr, weight_decay, betas, eps) stay those ``optimizer`` was
    built with for this phase. The official code takes them from the checkpoint too, but its
    fine-tuning recipe uses the pre-training ones (wd 0.1, betas, eps) and its scheduler sets lr
    at every step, so this gives the same updates; keeping the phase's ``initial_lr`` matters here
    because ``LambdaLR`` would otherwise take the pre-training peak lr stored with the state as
    its base. Works before or after the scheduler is made; ``state`` itself is not modified.

    Args:
        optimizer: built for the phase over the same parameter groups, in the same order, as
            the optimizer that wrote ``state`` (``poisonbench.train.param_groups`` of the model).
        state: ``optimizer.state_dict()`` of the undefended model's training.
    Raises:
        ValueError: ``state`` does not fit the groups (another model or another grouping).
    """
    keep = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(copy.deepcopy(state))  # torch would share the caller's moment tensors
    except (ValueError, KeyError) as e:
        raise ValueError(f"the saved optimizer state does not fit this model's parameter groups ({e}); it must "
                         "come from the training of this same model with the same grouping, or set "
                         "restore_optimizer=False to start a fresh AdamW") from None
    for group, hyper in zip(optimizer.param_groups, keep):
        for k in [k for k in group if k != "params" and k not in hyper]:
            del group[k]
        group.update(hyper)


def phase_optimizer(groups: list[dict], lr: float, state: dict | None = None) -> torch.optim.AdamW:
    """AdamW of the fine-tuning phase (betas 0.9/0.999, eps 1e-8, spec §2.4) over ``groups``
    (``poisonbench.train.param_groups``, which sets each group's weight decay), with the poisoned
    model's optimizer ``state`` restored when given (``restore_optimizer_state_``), fresh otherwise
    (``restore_optimizer=False``, or a cached model saved without its optimizer state).

    Raises ValueError when ``state`` does not fit ``groups``.
    """
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS)
    if state is not None:
        restore_optimizer_state_(optimizer, state)
    return optimizer
