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


# The slowest modules first (each 30-150 s; the two Flower deployments are mostly waiting on
# Flower's polls), so that pytest-xdist's workers finish together instead of one of them starting
# a long test at the end. Measured with `make test` (--durations). `make test` distributes whole
# files (--dist loadfile): a module-scoped fixture (the fraud smoke, the Ray head) runs once, and
# the two deployments of test_deploy.py never run at once.
SLOW_FIRST = ("integrations/test_deploy.py", "test_bench_ray.py", "test_benchmarks_fraud.py",
              "test_benchmarks_byzantine.py", "test_benchmarks_inversion.py", "test_benchmarks_privacy_utility.py",
              "test_benchmarks_backdoor.py", "test_benchmarks_byzfl.py", "test_benchmarks_tune.py",
              "test_bench_claims.py", "test_layout.py", "test_checkpoint.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(SLOW_FIRST) if path.endswith(name)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the order within a module and among the rest is kept
