"""``bench preview``: clean training images beside their poisoned versions, with captions."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .utils import atomic_write  # noqa: E402


FORMATS = ("png", "pdf", "svg")


def save_preview(pairs: list[tuple], title: str, out: str | Path, dpi: int = 150) -> Path:
    """Write a grid: one row per (clean, poisoned, clean caption, poisoned caption) tuple of uint8
    [3, H, W] images, clean on the left, poisoned in the middle, and on the right their absolute
    difference amplified to the full range (so a subtle trigger, e.g. WaNet's warp, shows; the
    gain is in the column's title). The format follows the file's extension: .png, .pdf or .svg.
    Raises ValueError when ``pairs`` is empty or the extension is another."""
    out = Path(out)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"--out {out}: the preview is written as {', '.join(FORMATS)} (by the file's extension)")
    if not pairs:
        raise ValueError("this attack poisons no training pair, so there is nothing to preview")
    n = len(pairs)
    fig, axes = plt.subplots(n, 3, figsize=(8.4, 2.1 * n), squeeze=False)
    for row, (clean, poisoned, cap_clean, cap_poison) in zip(axes, pairs):
        diff = (poisoned.float() - clean.float()).abs().amax(dim=0)
        gain = 255.0 / float(diff.max()) if float(diff.max()) > 0 else 1.0
        for ax, img, text in ((row[0], clean.permute(1, 2, 0).numpy(), "clean: " + repr(cap_clean)),
                              (row[1], poisoned.permute(1, 2, 0).numpy(), "poisoned: " + repr(cap_poison)),
                              (row[2], (diff * gain).clamp(0, 255).byte().numpy(),
                               "difference" + (f" x{gain:.0f}" if float(diff.max()) > 0 else ": none"))):
            ax.imshow(img, interpolation="nearest", cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title("\n".join(textwrap.wrap(text, 38)), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    plt.close(fig)
    return out
