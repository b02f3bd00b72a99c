"""RoCLIP's augmentations: image views (docs/roclip-spec.md §1.8) and EDA caption rewrites (§1.9).

Image: RandomHorizontalFlip -> RandomResizedCrop -> ColorJitter (p=0.8) -> RandomGrayscale (p=0.2)
-> GaussianBlur, with the crop size and blur kernel and sigma scaled from the paper's 224 px to the
model's image size. Text: EDA (Wei & Zou 2019) with one of its four operations chosen per caption.
"""
from __future__ import annotations

import random
import re

import kornia.augmentation as K

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
        K.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((kernel, kernel), (0.1 * f, 2.0 * f), p=1.0),
    )
