"""Datasets (loaders with cache and checksums) and partitioners."""

from .datasets import Dataset, load_dataset
from .partition import partition

__all__ = ["Dataset", "load_dataset", "partition"]
