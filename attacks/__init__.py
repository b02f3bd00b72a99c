"""Built-in attacks. Importing this package registers none of them: the registry imports the
modules named in ``BUILTIN_MODULES`` on its first look-up, so importing ``attacks.base`` (or this
package) loads no attack and no dataset module."""
from .base import Attack, AttackContext, PoisonPlan, ZeroShotModel

# Modules of this package that register the built-in attacks (imported by ``registry.Registry``).
BUILTIN_MODULES = ("badclip", "badnet", "badnet_lc", "blended", "none", "sig", "targeted", "wanet")

__all__ = ["Attack", "AttackContext", "PoisonPlan", "ZeroShotModel", "BUILTIN_MODULES"]
