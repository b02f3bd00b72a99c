"""BadCLIP's trigger optimisation against a frozen surrogate CLIP (Liang et al., CVPR 2024), as the
official code computes it: ../shared/reference/spec-badclip-density-detection.md Part A (§A.3 trigger
form, §A.5 objective, §A.6 optimiser; quirks Q1-Q3 of §A.13). Pure functions of tensors and a model;
``attacks/badclip.py`` builds the data and stores the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from poisonbench.preprocess import eval_geometry, normalize

#: logit scale of the text-alignment term: the OpenAI RN50's exp(logit_scale), used unchanged (§A.5)
TEXT_SCALE = 100.0


def centre_offset(side: int, patch: int) -> int:
    """Row (= column) of the patch's top-left pixel in a ``side`` px image: ``int(int(H/2) - l/2)``
    (§A.3: rows/cols 104-119 for 16 px at 224)."""
    return int(int(side / 2) - patch / 2)


def paste_centre(images: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """``images`` [N, 3, H, W] (uint8 or float) with ``patch`` [3, s, s] (same dtype) written over
    the centre pixels (hard replacement, no blending; §A.3); a copy, differentiable in both
    arguments for float tensors."""
    out = images.clone()
    s = patch.shape[-1]
    r, c = centre_offset(images.shape[-2], s), centre_offset(images.shape[-1], s)
    out[..., r : r + s, c : c + s] = patch
    return out


def deploy(patch: torch.Tensor, mode: str) -> torch.Tensor:
    """The uint8 trigger [3, s, s] the poisoned pairs and the ASR use, from the optimised float
    patch [3, s, s] (any range; clamped to [0, 1]): x 255 and truncated to integers (§A.6
    "output"); for ``jpeg_bgr`` (faithful, quirk Q3) then saved as OpenCV does (the RGB array read
    as BGR, JPEG at OpenCV's default quality 95) and loaded as RGB with PIL, i.e. R and B swapped
    and JPEG compressed (Pillow's libjpeg at quality 95, 4:2:0 chroma as OpenCV's default);
    ``exact``: no swap, no JPEG. Raises ValueError for another mode."""
    pixels = (patch.detach().float().clamp(0, 1) * 255).to(torch.uint8)  # truncation, as astype(int)
    if mode == "exact":
        return pixels
    if mode != "jpeg_bgr":
        raise ValueError(f"badclip: unknown deploy mode {mode!r}; valid: jpeg_bgr, exact")
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.flip(0).permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=95, subsampling="4:2:0")
    with Image.open(buffer) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def triplet_weight_and_margin(name: str) -> tuple[float, float]:
    """(weight, margin) of the triplet term as the official code reads them from a run name
    (§A.5): weight ``int(name[-3:])``, margin NN/10 when the name holds ``_NN_tri``, else 1.0.
    Kept to document (and test) how the released trigger's ``tri*500`` means weight 500, margin 1."""
    import re

    found = re.search(r"_([0-9]{2})_tri", name)
    return float(int(name[-3:])), (int(found.group(1)) / 10 if found else 1.0)


@dataclass
class Objective:
    """The weights of BadCLIP's loss L = L_it + triplet_weight * L_tri (§A.5; released trigger:
    weight 500, margin 1.0) and where the triplet's negatives come from: ``faithful_inplace``
    (the official code's in-place paste makes them triggered embeddings of other batch images,
    stop-gradient; quirk Q1) or ``intended_clean`` (clean embeddings of those images)."""

    triplet_weight: float = 500.0
    margin: float = 1.0
    negatives: str = "faithful_inplace"


def image_embeddings(model, images: torch.Tensor, size: int) -> torch.Tensor:
    """L2-normalised image embeddings, float32 [N, D], of float images [N, 3, H, W] in [0, 1]
    brought to the model's ``size`` (bicubic, as ``eval_geometry``); differentiable."""
    x = eval_geometry(images, size) if images.shape[-1] != size else images
    return F.normalize(model.encode_image(normalize(x)).float(), dim=-1)


def loss_terms(model, size: int, images: torch.Tensor, patch: torch.Tensor, text_emb: torch.Tensor,
               pos_emb: torch.Tensor, objective: Objective, g: torch.Generator) -> dict[str, torch.Tensor]:
    """BadCLIP's loss terms of one batch (§A.5), differentiable in ``patch``.

    Args:
        model: the frozen surrogate; size: its input side in pixels.
        images: float [B, 3, H, W] in [0, 1], the batch (augmented or not) without the trigger.
        patch: float [3, s, s], the trigger parameter; pasted clamped to [0, 1] (``clamp`` has a
            zero gradient outside, so a pixel that leaves [0, 1] freezes, §A.3).
        text_emb: float [B, D], L2-normalised embeddings of the batch's target captions.
        pos_emb: float [P, D], P >= B, L2-normalised embeddings of target-class images; B of them,
            drawn without replacement with ``g``, are the positives.
        objective: weights and negatives (``Objective``).
        g: generator of the positives' and negatives' permutations.
    Returns:
        {"img_text": scalar, "triplet": scalar (unweighted), "loss": img_text + weight x triplet}.
    """
    b = len(images)
    a = image_embeddings(model, paste_centre(images, patch.clamp(0, 1)), size)
    logits = TEXT_SCALE * a @ text_emb.T
    target = torch.arange(b, device=a.device)
    img_text = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    pos = pos_emb[torch.randperm(len(pos_emb), generator=g)[:b].to(pos_emb.device)]
    sigma = torch.randperm(b, generator=g).to(a.device)
    if objective.negatives == "faithful_inplace":
        neg = a.detach()[sigma]
    elif objective.negatives == "intended_clean":
        with torch.no_grad():
            neg = image_embeddings(model, images, size)[sigma]
    else:
        raise ValueError(f"badclip: unknown negatives {objective.negatives!r}; valid: faithful_inplace, intended_clean")
    triplet = F.triplet_margin_loss(a, pos, neg, margin=objective.margin, p=2)  # eps 1e-6, as torch's module
    return {"img_text": img_text, "triplet": triplet, "loss": img_text + objective.triplet_weight * triplet}


def optimise_trigger(model, size: int, images: torch.Tensor, text_emb: torch.Tensor, pos_emb: torch.Tensor,
                     patch_size: int, objective: Objective, epochs: int, batch_size: int, lr: float,
                     aug_prob: float, g: torch.Generator, device: torch.device,
                     progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Optimise BadCLIP's trigger (§A.4-§A.6).

    Args:
        model: the frozen surrogate (eval mode; its weights are never changed).
        size: its input side; images: uint8 [N, 3, H, W], the patch-training images;
        text_emb: float [N, D], row i the embedding of image i's target caption (constant: the
            official EDA is a no-op, quirk Q2, and the surrogate is frozen);
        pos_emb: float [P, D], target-class image embeddings (P >= batch_size);
        patch_size: s; objective: the loss (``Objective``); epochs, batch_size, lr: Adam (betas
            0.9/0.999, no decay) over ``epochs`` x floor(N / batch_size) steps, batches shuffled with
            ``g``, the last partial batch dropped (§A.6);
        aug_prob: per batch, the chance that every image of it is replaced by its torchvision
            AutoAugment (ImageNet policy) version before the trigger is pasted (§A.5);
        g: the generator of every draw (init, shuffles, augmentation, positives, negatives);
        progress: called with (step, steps) after each step.
    Returns:
        (patch float [3, s, s] clamped to [0, 1], record: steps, first and last losses).
    Raises:
        ValueError: fewer images or positives than one batch.
    """
    from torchvision.transforms import v2

    n = len(images)
    if n < batch_size or len(pos_emb) < batch_size:
        raise ValueError(f"badclip: {n} patch-training images and {len(pos_emb)} target images; both must hold one "
                         f"batch of {batch_size}")
    init = (0.5 + 0.25 * torch.randn(3, patch_size, patch_size, generator=g)).clamp(0, 1)  # N(0.5, 0.25), §A.6
    patch = init.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=lr)
    augment = v2.AutoAugment()
    text_emb, pos_emb = text_emb.to(device), pos_emb.to(device)
    steps, per_epoch = 0, n // batch_size
    total = epochs * per_epoch
    first = last = None
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for k in range(per_epoch):
            rows = order[k * batch_size : (k + 1) * batch_size]
            batch = images[rows]
            if torch.rand((), generator=g).item() < aug_prob:
                with torch.random.fork_rng(devices=[]):  # AutoAugment draws from torch's global RNG
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=g)))
                    batch = torch.stack([augment(im) for im in batch])
            terms = loss_terms(model, size, batch.to(device).float() / 255, patch, text_emb[rows], pos_emb, objective, g)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            steps += 1
            last = {k: float(v.detach()) for k, v in terms.items()}
            first = first or last
            if progress is not None:
                progress(steps, total)
    record = {"steps": steps, "first_loss": first, "last_loss": last}
    return patch.detach().clamp(0, 1).cpu(), record
