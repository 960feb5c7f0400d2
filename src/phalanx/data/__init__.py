"""Datasets (loaders with cache and checksums), tabular data and partitioners.

Importing this package registers every built-in dataset, the tabular ones included.
"""

from . import fraud  # noqa: F401  (registers creditcard and fraud-synth)
from .datasets import Dataset, load_dataset
from .partition import partition
from .tabular import load_configured

__all__ = ["Dataset", "load_configured", "load_dataset", "partition"]
