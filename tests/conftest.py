import os

import pytest
import torch

import phalanx  # noqa: F401  (registers every plug-in)

torch.set_num_threads(1)
os.environ.setdefault("PHALANX_CACHE", "/nonexistent-phalanx-cache")  # tests never download


@pytest.fixture
def tiny_config():
    """A config on scikit-learn's digits that runs in about a second."""
    return {
        "name": "tiny", "seed": 3,
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"name": "logreg"},
        "federation": {"num_clients": 6, "rounds": 3, "batch_size": 16, "lr": 0.1},
        "defense": ["mean"],
    }
