"""poisonbench: a benchmark of data-poisoning and backdoor attacks on CLIP pre-training."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("poisonbench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .registry import (  # noqa: E402
    RegistryError,
    get_attack,
    get_dataset,
    get_defense,
    list_attacks,
    list_datasets,
    list_defenses,
    register_attack,
    register_dataset,
    register_defense,
)

__all__ = [
    "RegistryError", "get_attack", "get_dataset", "get_defense", "list_attacks", "list_datasets",
    "list_defenses", "register_attack", "register_dataset", "register_defense", "__version__",
]
