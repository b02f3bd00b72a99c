"""Built-in attacks. Importing this package registers them."""
from . import badnet, badnet_lc, blended, none, sig, targeted, wanet  # noqa: F401
from .base import Attack, PoisonPlan, ZeroShotModel

__all__ = ["Attack", "PoisonPlan", "ZeroShotModel"]
