"""phalanx: federated learning under Byzantine attack.

Attacks, composable defense layers, and the comparative analysis between them, on real data.
This module re-exports the public API; importing it registers every built-in dataset, model,
attack and defense.
"""

from . import models  # noqa: F401  (registers models)
from . import attacks, defenses  # noqa: F401  (register attacks and defenses)
from .context import AttackContext, RoundContext
from .data import Dataset, load_dataset, partition
from .defenses.base import Aggregator, Layer, Post, Report
from .defenses.pipeline import Pipeline
from .errors import BoundError, ConfigError, DataError, IntegrityError, PhalanxError
from .registry import ATTACKS, DATASETS, DEFENSES, MODELS, POISONS
from .updates import cosine_matrix, flatten_params, load_flat, pairwise_sq_dists

__version__ = "0.1.0"

__all__ = [
    "ATTACKS", "DATASETS", "DEFENSES", "MODELS", "POISONS", "Aggregator", "AttackContext",
    "BoundError", "ConfigError", "DataError", "Dataset", "IntegrityError", "Layer", "PhalanxError",
    "Pipeline", "Post", "Report", "RoundContext", "cosine_matrix", "flatten_params", "load_dataset",
    "load_flat", "pairwise_sq_dists", "partition",
]
