"""The ``--init`` value of a cell (its starting weights) as text: parsed and normalised here, a
leaf module (``config`` checks it, ``models`` loads what it names)."""
from __future__ import annotations

from pathlib import Path

INIT_KINDS = ("scratch", "clean", "checkpoint:PATH", "pretrained:ARCH/TAG")


def parse_init(spec: str) -> tuple[str, str]:
    """(kind, argument) of an ``--init`` value: ``scratch`` (random weights seeded by the cell),
    ``clean`` (the clean model of the cell's pre-training profile, trained once and cached;
    ``runner.clean_config``), ``checkpoint:PATH`` (an open_clip state dict or training checkpoint file) or
    ``pretrained:ARCH/TAG`` (an open_clip pretrained tag, from the local cache only).
    Raises ValueError naming the valid forms."""
    if spec in ("scratch", "clean"):
        return spec, ""
    kind, sep, arg = spec.partition(":")
    if kind == "checkpoint" and arg:
        return kind, arg
    if kind == "pretrained" and arg.count("/") == 1 and all(arg.split("/")):
        return kind, arg
    raise ValueError(f"--init {spec!r} is not one of: {', '.join(INIT_KINDS)} (e.g. pretrained:RN50/openai)")


def absolute_init(spec: str) -> str:
    """``spec`` checked (``parse_init``), with a checkpoint's path made absolute, so that the
    cell names the same file from any working directory."""
    kind, arg = parse_init(spec)
    if kind == "checkpoint":
        return f"checkpoint:{Path(arg).expanduser().resolve()}"
    return spec


