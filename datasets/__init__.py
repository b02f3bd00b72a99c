"""Built-in datasets. Importing this package registers none of them: the registry imports the
modules named in ``BUILTIN_MODULES`` on its first look-up, so importing the data containers
(``datasets.base``) loads no dataset module."""
from .base import CaptionDataset, DatasetBundle, EvalSet

# Modules of this package that register the built-in datasets (imported by ``registry.Registry``).
BUILTIN_MODULES = ("fashion_mnist", "files")

__all__ = ["CaptionDataset", "DatasetBundle", "EvalSet", "BUILTIN_MODULES"]
