"""CLIP models: the package's small open_clip configs, built from scratch (nothing is downloaded)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import open_clip
import torch

from .init_spec import parse_init

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


# --- a cell's starting point (--init) ----------------------------------------------------------

def pretrained_file(arch: str, tag: str) -> Path:
    """The local file of open_clip's pretrained weights ``arch``/``tag``, looked up in the
    Hugging Face cache (``HF_HUB_CACHE``, default ~/.cache/huggingface/hub) where
    ``open_clip.create_model(arch, pretrained=tag)`` leaves it, or, for a weight that open_clip
    downloads by URL, in ~/.cache/clip. Nothing is downloaded.

    Raises ValueError (unknown tag, listing the model's tags) or FileNotFoundError saying where
    to put the file."""
    from open_clip import pretrained as pt

    cfg = pt.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = pt.list_pretrained_tags_by_model(arch)
        raise ValueError(f"open_clip has no pretrained weights {arch}/{tag}; its tags for {arch}: "
                         f"{', '.join(tags) or '(no tags)'}")
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" (open_clip's default file) or "org/name/file"
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return Path(found)
        where = (f"the Hugging Face cache as hf://{repo}/{names[0]} (on a machine with internet: python -c "
                 f"\"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\", then copy "
                 f"~/.cache/huggingface/hub/models--{repo.replace('/', '--')} here, or set HF_HUB_CACHE)")
    else:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return path
        where = f"{path} (downloaded from {cfg['url']})"
    raise FileNotFoundError(f"--init pretrained:{arch}/{tag}: the weights are not on this machine and nothing is "
                            f"downloaded; put them in {where}, or give --init checkpoint:PATH to a file you have")


def init_file(spec: str, model_name: str) -> Path | None:
    """The weights file a cell of architecture ``model_name`` starts from (None for scratch and
    for clean, whose file the runner makes: ``runner.clean_model``), checked to exist. Raises ValueError (a bad spec; a pretrained architecture other than the
    cell's) or FileNotFoundError (saying where the file should be)."""
    kind, arg = parse_init(spec)
    if kind in ("scratch", "clean"):
        return None
    if kind == "checkpoint":
        path = Path(arg).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--init checkpoint:{arg}: no such file")
        return path
    arch, tag = arg.split("/")
    if arch != model_name:
        raise ValueError(f"--init pretrained:{arch}/{tag} is for model {arch}, but the cell's model is {model_name}; "
                         f"add --model {arch}")
    return pretrained_file(arch, tag)


def load_init(model: torch.nn.Module, spec: str, model_name: str, clean: Path | None = None) -> Path | None:
    """Load the starting weights ``spec`` (``parse_init``) into ``model`` in place, with
    ``torch.load(weights_only=True)`` (open_clip's ``load_checkpoint``: a state dict, a training
    checkpoint's ``state_dict``, ``module.`` prefixes stripped, safetensors), strictly: every
    parameter must be in the file with its shape. Returns the file (None for scratch).
    Raises ValueError when the file does not fit the architecture, FileNotFoundError as
    ``init_file``. ``clean``: the file of the clean model, for ``spec`` ``clean`` (ValueError
    without it)."""
    path = init_file(spec, model_name)
    if spec == "clean":
        if clean is None:
            raise ValueError("--init clean: the clean model's file was not given (runner.clean_model makes it)")
        path = clean
    if path is None:
        return None
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except (RuntimeError, KeyError, AssertionError) as e:  # open_clip asserts on some shape mismatches
        first = " ".join(str(e).strip().splitlines()[:3])
        if "PytorchStreamReader" in first or "zip archive" in first:
            raise ValueError(f"--init {spec}: {path} cannot be read (cut short, or not a torch file): {first[:300]}; "
                             "replace or delete it") from None
        raise ValueError(f"--init {spec}: the weights in {path} do not fit model {model_name}: {first[:500]}") from None
    except Exception as e:  # noqa: BLE001 - a file that is no checkpoint at all (text, an optimizer state)
        raise ValueError(f"--init {spec}: {path} is not an open_clip state dict or checkpoint "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    return path
