"""derived_seeds: numpy's per-client seeds, computed for many clients at once, bit for bit."""

import numpy as np
import torch

from phalanx.metrics import client_stats
from phalanx.seeding import derived_seeds, reference_seed


def test_derived_seeds_match_numpy():
    rng = np.random.default_rng(0)
    for prefix in ([0, 0], [3, 17], [2**32 - 1, 5], [int(rng.integers(2**32)), int(rng.integers(2**32))], [7]):
        last = np.concatenate([[0, 1, 2**32 - 1], rng.integers(0, 2**32, 50)])
        want = [reference_seed(prefix + [int(v)]) for v in last]
        assert derived_seeds(prefix, last).tolist() == want, prefix


def test_derived_seeds_fall_back_outside_32_bit_words():
    assert derived_seeds([2**40, 1], [3]).tolist() == [reference_seed([2**40, 1, 3])]
    assert derived_seeds([1, 2, 3, 4], [5]).tolist() == [reference_seed([1, 2, 3, 4, 5])]
    assert derived_seeds([0, 1], []).tolist() == []


def test_client_stats_in_blocks_equal_one_float64_product():
    g = torch.randn(3000)
    U = torch.randn(1000, 3000) * torch.rand(1000, 1)
    U[7, 3] = float("nan")
    U[500, 0] = float("inf")
    norms, cos, finite = client_stats(U, g, block_bytes=1 << 20)  # blocks of 64 rows
    clean = torch.where(torch.isfinite(U).all(1)[:, None], U, 0.0).double()
    want_norms = clean.norm(dim=1)
    want_cos = (clean @ g.double()) / (want_norms * g.double().norm()).clamp_min(1e-12)
    assert finite.tolist() == [i not in (7, 500) for i in range(1000)]
    assert torch.equal(norms, want_norms) and torch.equal(cos, want_cos)
