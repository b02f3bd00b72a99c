"""CLIP models: the package's small open_clip configs, built from scratch (nothing is downloaded)."""
from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Add the package's model configs (``poisonbench-tiny``, ``poisonbench-cpu-small``) to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def create_model(name: str) -> tuple[torch.nn.Module, open_clip.tokenizer.SimpleTokenizer]:
    """A randomly initialised open_clip CLIP model and its tokenizer.

    Args:
        name: an open_clip architecture (``list_models()``), e.g. ``poisonbench-cpu-small`` or ``RN50``.
    Returns:
        (model, tokenizer). ``model(images, tokens)`` takes float images [B, 3, S, S] and int64
        tokens [B, context_length] and returns L2-normalised image and text embeddings
        [B, embed_dim] (float32) and ``exp(logit_scale)`` (a scalar). The tokenizer maps a list
        of B strings to int64 [B, context_length], truncating long captions but keeping the
        end-of-text token.
    Raises:
        ValueError: unknown architecture (the message lists the valid ones).
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(open_clip.list_models())}")
    # open_clip warns that no pretrained weights were loaded: that is the point here (pre-training).
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=None)
    finally:
        logger.setLevel(level)
    return model, open_clip.get_tokenizer(name)


def image_size(model: torch.nn.Module) -> int:
    """Side length in pixels of the square images the model's vision tower expects."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
