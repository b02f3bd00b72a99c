"""RoCLIP's augmentations: image views (docs/roclip-spec.md §1.8) and EDA caption rewrites (§1.9).

Image: RandomHorizontalFlip -> RandomResizedCrop -> ColorJitter (p=0.8) -> RandomGrayscale (p=0.2)
-> GaussianBlur, with the crop size and blur kernel and sigma scaled from the paper's 224 px to the
model's image size. Text: EDA (Wei & Zou 2019) with one of its four operations chosen per caption.
"""
from __future__ import annotations

import functools
import math
import random
import re

import kornia.augmentation as K
import torch

from . import wordnet

# EDA's stop-word list (Wei & Zou 2019, eda.py), never replaced by synonyms.
STOP_WORDS = frozenset(
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her "
    "hers herself it its itself they them their theirs themselves what which who whom this that these "
    "those am is are was were be been being have has had having do does did doing a an the and but if "
    "or because as until while of at by for with about against between into through during before "
    "after above below to from up down in out on off over under again further then once here there "
    "when where why how all any both each few more most other some such no nor not only own same so "
    "than too very s t can will just don should now".split()
)


def clean_caption(caption: str) -> str:
    """EDA's ``get_only_chars``: lower-case, drop apostrophes, keep a-z only, single spaces."""
    s = caption.lower().replace("'", "").replace("\u2019", "")
    s = re.sub(r"[^a-z]", " ", s)
    return re.sub(r" +", " ", s).strip()


def eda(caption: str, rng: random.Random, alpha: float = 0.1) -> str:
    """One EDA rewrite of ``caption`` (docs/roclip-spec.md §1.9; Wei & Zou 2019).

    One of synonym replacement, random insertion, random swap and random deletion is chosen
    uniformly; the first three change n = max(1, floor(alpha * words)) words, deletion drops each
    word with probability ``alpha`` and keeps at least one. Synonyms come from WordNet
    (``poisonbench.wordnet``). The caption is cleaned first as EDA does (digits and punctuation
    become spaces). A caption with no a-z word left after cleaning (empty, digits only,
    non-Latin script) is returned unchanged: EDA has nothing to work on and an empty caption
    would silently replace it. ``alpha`` 0 returns every caption unchanged (EDA switched off),
    drawing nothing from ``rng``.

    Args:
        caption: any string.
        rng: source of randomness (the result is deterministic given its state).
        alpha: EDA's alpha_sr = alpha_ri = alpha_rs = p_rd, in [0, 1].
    Raises:
        ValueError: alpha outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"EDA alpha must be in [0, 1], got {alpha}")
    if alpha == 0:
        return caption
    words = clean_caption(caption).split()
    if not words:
        return caption
    n = max(1, int(alpha * len(words)))
    op = rng.randrange(4)
    if op == 0:
        out = _synonym_replacement(words, n, rng)
    elif op == 1:
        out = _random_insertion(words, n, rng)
    elif op == 2:
        out = _random_swap(words, n, rng)
    else:
        out = _random_deletion(words, alpha, rng)
    return " ".join(out)


def _synonym_replacement(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    candidates = sorted({w for w in words if w not in STOP_WORDS})
    rng.shuffle(candidates)
    replaced = 0
    for w in candidates:
        syns = wordnet.synonyms(w)
        if syns:
            pick = rng.choice(syns)
            out = [pick if x == w else x for x in out]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(out).split()


def _random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    for _ in range(n):
        for _attempt in range(10):
            syns = wordnet.synonyms(out[rng.randrange(len(out))])
            if syns:
                out.insert(rng.randrange(len(out) + 1), rng.choice(syns))
                break
    return out


def _random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    return out


def _random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) == 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [words[rng.randrange(len(words))]]


def eda_captions(captions: list[str], seed: int, alpha: float = 0.1) -> list[str]:
    """One fixed EDA rewrite per caption, seeded (the official code's once-per-run rewrite, §1.9)."""
    rng = random.Random(seed)
    return [eda(c, rng, alpha) for c in captions]


def image_augmentation(size: int, min_crop: float = 0.08) -> K.AugmentationSequential:
    """RoCLIP's image augmentation (docs/roclip-spec.md §1.8) for ``size`` x ``size`` model inputs,
    applied to whole batches with an independent random draw per image (kornia).

    Takes float images [B, 3, H, W] in [0, 1] and returns float [B, 3, size, size] in [0, 1].
    Pixel-unit settings of the 224 px original are scaled by size/224: the Gaussian blur kernel
    (21 px, kept odd and >= 3) and its sigma range (0.1-2.0 px). Randomness comes from torch's
    global RNG. ``min_crop`` is the smallest crop area as a fraction of the image, in (0, 1].
    """
    f = size / 224
    kernel = max(3, int(round(21 * f)) | 1)
    return K.AugmentationSequential(
        K.RandomHorizontalFlip(p=0.5),
        K.RandomResizedCrop((size, size), scale=(min_crop, 1.0), ratio=(3 / 4, 4 / 3)),
        ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((kernel, kernel), (0.1 * f, 2.0 * f), p=1.0),
    )


class ColorJitter(K.ColorJitter):
    """kornia's ``ColorJitter`` (same parameters, random draws and outputs, bit for bit: a test holds
    it to the stock class) with its hue step computed by :func:`adjust_hue`. On CPU kornia's hue
    step (RGB -> HSV -> RGB through nested ``torch.where``) was most of the colour jitter's time. A
    fixed ``order=`` takes kornia's own path, equal but without the faster hue."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hue_fn = adjust_hue  # the hook kornia's ColorJitter calls with the hue angle in radians


_TWO_PI = 2 * math.pi
# kornia.color.hsv_to_rgb's nested torch.where as a table: for hue sextant i (0..5), red, green and
# blue take candidate (v, q, p, t)[k], k in 0..3, stored as 4-bit digit i of the channel's code.
_SEXTANT = ((0, 1, 2, 2, 3, 0), (3, 0, 0, 1, 2, 2), (2, 2, 3, 0, 0, 1))


@functools.lru_cache(maxsize=None)
def _sextant_codes(device: torch.device) -> torch.Tensor:
    """The three channels' codes, int64 [3, 1, 1] on ``device`` (copied there once)."""
    return torch.tensor([sum(k << 4 * i for i, k in enumerate(row)) for row in _SEXTANT], device=device).view(3, 1, 1)


def adjust_hue(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``kornia.enhance.adjust_hue`` bit for bit (a test compares them), faster on CPU.

    kornia converts RGB to HSV, adds ``factor`` to the hue modulo 2 pi and converts back. This does
    the same arithmetic in the same order; only the selections change: ``torch.where`` and
    ``masked_fill`` (ten times slower than arithmetic on CPU here) become ``torch.lerp`` with weight
    0 or 1 (which returns an end point exactly) and a ``gather``, and the two remainders inside the
    colour conversions, whose arguments lie within one period of their range, become a ``floor``
    and a product (exact there). A grey image (its three channels equal everywhere) comes out of
    kornia's arithmetic exactly as it went in (saturation 0 makes p = q = t = v), so it is copied,
    not converted: every Fashion-MNIST image is grey.

    Forward only: gradients at pixels whose channels tie are split differently from kornia's (the
    augmentation is never differentiated). Equal for any finite input below float overflow.

    Args:
        image: float RGB images [B, 3, H, W] in [0, 1].
        factor: float tensor [B] (not a Python float), each image's hue shift in radians, in [-pi, pi].
    Returns:
        float [B, 3, H, W], the same dtype and device as ``image``.
    """
    factor = factor.to(image.device, image.dtype, non_blocking=True)  # kornia draws it on the CPU
    r, g, b = image.unbind(-3)
    grey = ((r == g) & (g == b)).flatten(-2).all(-1)  # [B]
    if not grey.any():
        return _shift_hue(image, factor)
    out = image.clone()  # kornia's arithmetic returns a grey image exactly as it is (saturation 0)
    if not grey.all():  # Fashion-MNIST: every image grey, nothing to compute
        colour = ~grey
        out[colour] = _shift_hue(image[colour], factor[colour])
    return out


def _shift_hue(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(image)
    h = torch.remainder(h + factor.view(-1, *[1] * (h.dim() - 1)), _TWO_PI)
    return _hsv_to_rgb(h * (h < _TWO_PI), s, v)


def _pick(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(cond, a, b)`` exactly, for finite ``a`` and ``b``."""
    return torch.lerp(b, a, cond.to(a.dtype))


def _rgb_to_hsv(image: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kornia.color.rgb_to_hsv as three [B, H, W] planes: hue in [0, 2 pi), saturation, value."""
    r, g, b = image.unbind(-3)
    max_rgb = torch.maximum(torch.maximum(r, g), b)
    deltac = max_rgb - torch.minimum(torch.minimum(r, g), b)
    s = deltac / _pick(max_rgb == 0, torch.ones_like(max_rgb), max_rgb + eps)
    deltac = _pick(deltac == 0, torch.ones_like(deltac), deltac)
    rc, gc, bc = max_rgb - r, max_rgb - g, max_rgb - b
    h1 = bc - gc
    h2 = (rc - bc) + 2.0 * deltac
    h3 = (gc - rc) + 4.0 * deltac
    h = _pick((r >= g) & (r >= b), h1, _pick(g >= b, h2, h3)) / deltac / 6.0
    h = 2.0 * math.pi * (h - torch.floor(h))  # h % 1.0 for h in (-1, 1)
    return h * (h < _TWO_PI), s, max_rgb


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """kornia.color.hsv_to_rgb of hue planes in [0, 2 pi): RGB [B, 3, H, W]."""
    y = h / _TWO_PI * 6
    y = y * (y < 6)  # y % 6 for y in [0, 6]
    hi = torch.floor(y)
    f = y - hi
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    hi = hi.long().clamp_(0, 5)
    idx = (_sextant_codes(hi.device) >> 4 * hi.unsqueeze(-3)) & 15  # [B, 3, H, W]: a table lookup, without slow indexing
    return torch.stack((v, q, p, t), dim=-3).gather(-3, idx)
