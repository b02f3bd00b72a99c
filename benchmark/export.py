"""A cell's final model as an open_clip ``local-dir`` folder: ``open_clip_config.json`` (the
architecture's ``model_cfg`` and the ``preprocess_cfg`` the evaluation used) and
``open_clip_pytorch_model.bin`` (the state dict). Every finished cell keeps its folder under
``RESULTS/models/<run_id>/`` (not committed; the resume checkpoint is removed, this is not);
``bench export RUN_ID OUT_DIR`` copies it, and then

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT_DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT_DIR")

load it (CLIP_benchmark: ``--model local-dir:OUT_DIR``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .preprocess import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from .utils import atomic_write

CONFIG_NAME, WEIGHTS_NAME = "open_clip_config.json", "open_clip_pytorch_model.bin"


def model_dir(results: str | Path, run_id: str) -> Path:
    """``RESULTS/models/<run_id>/``: the folder of cell ``run_id``'s final model."""
    return Path(results) / "models" / run_id


def save_model(model: torch.nn.Module, arch: str, folder: Path) -> None:
    """Write ``model`` (open_clip architecture ``arch``) to ``folder`` as open_clip's local-dir
    layout, each file atomically, the config last (it marks the folder complete). The
    preprocessing is the evaluation's: bicubic resize of the shorter side, centre crop, OpenAI
    mean/std (``poisonbench.preprocess``)."""
    import open_clip

    from .models import image_size, register_model_configs

    register_model_configs()
    config = {"model_cfg": open_clip.get_model_config(arch),
              "preprocess_cfg": {"size": image_size(model), "mean": list(OPENAI_DATASET_MEAN),
                                 "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic",
                                 "resize_mode": "shortest"}}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: torch.save(state, tmp))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def export(results: str | Path, run_id: str, out: str | Path) -> Path:
    """Copy cell ``run_id``'s final model folder to ``out`` (created; it must not hold files).
    Raises FileNotFoundError saying why there is none (no such cell; a cell that failed, or
    that finished before final models were kept: rerun it with --force), FileExistsError for a
    non-empty ``out``."""
    source = model_dir(results, run_id)
    if not (source / CONFIG_NAME).is_file() or not (source / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no final model of cell {run_id} in {source}: the cell has not finished in "
                                f"{results}, failed, or finished before final models were kept (rerun it with --force)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copyfile(source / name, out / name)
    return out
