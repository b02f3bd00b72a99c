"""Built-in defenses. Importing this package registers them."""
from . import aug_only, clip, roclip  # noqa: F401
from .base import Defense, TrainState

__all__ = ["Defense", "TrainState"]
