"""``bench preview``: clean training images beside their poisoned versions, with captions."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .utils import atomic_write  # noqa: E402


def save_preview(pairs: list[tuple], title: str, out: str | Path, dpi: int = 150) -> Path:
    """Write a grid PNG: one row per (clean, poisoned, clean caption, poisoned caption) tuple of
    uint8 [3, H, W] images, clean on the left. Raises ValueError when ``pairs`` is empty."""
    if not pairs:
        raise ValueError("this attack poisons no training pair, so there is nothing to preview")
    n = len(pairs)
    fig, axes = plt.subplots(n, 2, figsize=(6.4, 2.1 * n), squeeze=False)
    for row, (clean, poisoned, cap_clean, cap_poison) in zip(axes, pairs):
        for ax, img, cap, label in ((row[0], clean, cap_clean, "clean"), (row[1], poisoned, cap_poison, "poisoned")):
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(f"{label}: " + "\n".join(textwrap.wrap(repr(cap), 38)), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return out
