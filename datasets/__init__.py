"""Built-in datasets. Importing this package registers them."""
from . import fashion_mnist, files  # noqa: F401
from .base import CaptionDataset, DatasetBundle, EvalSet

__all__ = ["CaptionDataset", "DatasetBundle", "EvalSet"]
