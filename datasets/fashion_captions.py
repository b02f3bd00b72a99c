"""Caption styles for Fashion-MNIST (issue 17): captions that are not just the label.

The default style, ``templates``, writes every caption from a few hundred templates around a class
word: nearest-neighbour caption matching (RoCLIP) then amounts to pseudo-labelling. Two styles
ground the caption in the pixels instead, so captions of one class differ the way web captions do:

- ``attributes``: the garment word plus two to four attributes measured from the image itself:
  brightness (mean grey level of the garment's pixels), extent (share of the frame it fills),
  aspect (height / width of its bounding box), texture (spread of its grey levels) and position
  (its centre of mass against the frame's centre). Brightness, extent and texture are cut at the
  terciles of the whole 60k train split (the same words mean the same pixels in every seed).
- ``web``: as ``attributes``, and, as alt-text does, a share ``web_unnamed`` of the captions does
  not name the class at all ("an item", "my new favourite piece") and a share ``web_related`` names
  a related class instead (a t-shirt called a shirt, a sneaker a sandal); some carry alt-text
  clutter ("#ootd", "IMG_2041.jpg").

Everything is drawn from the caller's seeded ``random.Random``. Examples are in the README.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .base import with_article

STYLES = ("templates", "attributes", "web")

FOREGROUND = 20  # grey level above which a pixel belongs to the garment (the background is 0)

# Classes a web caption may name instead of the right one: look-alikes of Fashion-MNIST's confusion
# pairs. The bag has none: its web captions that would name a related class name none instead.
RELATED = {
    "t-shirt": ["shirt", "pullover"], "trouser": ["dress"], "pullover": ["coat", "shirt"],
    "dress": ["coat", "t-shirt"], "coat": ["pullover", "shirt"], "sandal": ["sneaker"],
    "shirt": ["t-shirt", "coat"], "sneaker": ["sandal", "ankle boot"], "bag": [], "ankle boot": ["sneaker", "sandal"],
}

UNNAMED = ["item", "piece", "new favourite", "thing I found", "product", "find of the week", "piece of clothing"]

ATTRIBUTE_TEMPLATES = [
    "a photo of {}, {}.",
    "{}, {}",
    "product shot: {}, {}",
    "a grayscale picture of {} ({})",
    "{} for sale, {}",
    "an image showing {}; {}",
]

CLUTTER = ["#ootd", "#fashion", "IMG_{}.jpg", "free shipping", "size M", "new in", "DSC{}", "sale!"]


@dataclass(frozen=True)
class Attributes:
    """What one image shows, as words (each from ``describe``)."""

    brightness: str
    extent: str
    aspect: str
    texture: str
    position: str

    def phrases(self) -> list[str]:
        """The attributes as phrases of a caption, in a fixed order."""
        return [f"{self.brightness} in tone", f"{self.extent} in the frame", self.aspect, self.texture, self.position]


def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image measurements of grey uint8 images [N, 3, H, W] (channel 0 is read):
    ``brightness`` (mean grey level of the foreground, in [0, 1]), ``extent`` (foreground share of
    the frame), ``aspect`` (bounding-box height / width), ``texture`` (std of the foreground's
    grey levels, in [0, 1]), ``dx`` / ``dy`` (centre of mass minus the frame's centre, in pixels);
    float32 [N] each. An image with no foreground pixel gets brightness, texture 0 and aspect 1."""
    x = images[:, 0].float() / 255
    fg = images[:, 0] > FOREGROUND
    n = fg.flatten(1).sum(1).clamp_min(1).float()
    brightness = (x * fg).flatten(1).sum(1) / n
    texture = ((((x - brightness[:, None, None]) ** 2) * fg).flatten(1).sum(1) / n).sqrt()
    h, w = x.shape[-2:]
    rows, cols = fg.any(2), fg.any(1)
    first = lambda m: m.float().argmax(1)  # noqa: E731 - first True index
    height = (m_h := rows.shape[1]) - first(rows.flip(1)) - first(rows)
    width = (m_w := cols.shape[1]) - first(cols.flip(1)) - first(cols)
    empty = ~fg.flatten(1).any(1)
    aspect = torch.where(empty, torch.ones_like(n), height.float() / width.float().clamp_min(1))
    mass = x.flatten(1).sum(1).clamp_min(1e-6)
    ys, xs = torch.arange(m_h).float(), torch.arange(m_w).float()
    dy = (x.sum(2) * ys).sum(1) / mass - (h - 1) / 2
    dx = (x.sum(1) * xs).sum(1) / mass - (w - 1) / 2
    return {"brightness": brightness, "extent": fg.flatten(1).float().mean(1), "aspect": aspect, "texture": texture,
            "dx": dx, "dy": dy}


def terciles(values: torch.Tensor) -> tuple[float, float]:
    """The 1/3 and 2/3 quantiles of float [N] ``values``."""
    q = torch.quantile(values.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    return float(q[0]), float(q[1])


def describe(m: dict[str, torch.Tensor], cuts: dict[str, tuple[float, float]]) -> list[Attributes]:
    """Words of each image's measurements ``m`` (``measure``), cut at ``cuts`` (terciles of
    brightness, extent and texture over a reference set)."""

    def level(key: str, words: tuple[str, str, str]) -> list[str]:
        lo, hi = cuts[key]
        return [words[0] if v < lo else words[2] if v >= hi else words[1] for v in m[key].tolist()]

    bright = level("brightness", ("dark", "mid-grey", "light"))
    extent = level("extent", ("small", "medium-sized", "large"))
    texture = level("texture", ("plain", "lightly textured", "strongly patterned"))
    aspect = ["tall and narrow" if a > 1.3 else "wide and low" if a < 1 / 1.3 else "about as wide as tall"
              for a in m["aspect"].tolist()]
    position = []
    for dx, dy in zip(m["dx"].tolist(), m["dy"].tolist()):
        where = [w for w, on in (("high", dy < -1.5), ("low", dy > 1.5), ("left", dx < -1.5), ("right", dx > 1.5)) if on]
        position.append("centred" if not where else "sitting " + " and ".join(where) + " in the frame")
    return [Attributes(*a) for a in zip(bright, extent, aspect, texture, position)]


def reference_cuts(images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Terciles of brightness, extent and texture over ``images`` (the whole train split)."""
    m = measure(images)
    return {k: terciles(m[k]) for k in ("brightness", "extent", "texture")}


def attribute_caption(word: str, attrs: Attributes, rng: random.Random) -> str:
    """``word`` (a noun phrase without article) with two to four of ``attrs``' phrases, in a
    random order and template."""
    phrases = attrs.phrases()
    picked = rng.sample(phrases, rng.randint(2, 4))
    return rng.choice(ATTRIBUTE_TEMPLATES).format(with_article(word), ", ".join(picked))


def web_caption(word: str, classname: str, attrs: Attributes, rng: random.Random, unnamed: float,
                related: float) -> str:
    """An alt-text-like caption: with probability ``unnamed`` no class word at all, with
    probability ``related`` a related class's name (``RELATED``; none for a class without one),
    else ``word``; attributes as ``attribute_caption``; one in four with clutter."""
    u = rng.random()
    if u < unnamed or (u < unnamed + related and not RELATED[classname]):
        word = rng.choice(UNNAMED)
    elif u < unnamed + related:
        word = rng.choice(RELATED[classname])
    caption = attribute_caption(word, attrs, rng)
    if rng.random() < 0.25:
        caption += " - " + rng.choice(CLUTTER).format(rng.randint(1000, 9999))
    return caption
