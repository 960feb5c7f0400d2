"""Many clients per round: per-client seeds derived at once (bit for bit numpy's), client
statistics in blocks (bit for bit one product), and the vectorized engine on clients smaller than
a batch (no padded samples computed; agrees with the sequential reference)."""

import numpy as np
import pytest
import torch

from phalanx.metrics import client_stats
from phalanx.models import build_model
from phalanx.seeding import derived_seeds, reference_seed
from phalanx.training import LocalSpec, local_update, vectorized_updates
from phalanx.updates import flatten_params


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


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_clients_smaller_than_a_batch_agree_with_the_sequential_reference(model):
    g = torch.Generator().manual_seed(0)
    m = build_model(model, (1, 8, 8), 10, seed=0)
    params = flatten_params(m)
    spec = LocalSpec(epochs=1, batch_size=32, lr=0.1, momentum=0.0, max_steps=1)
    sizes = [6, 3, 7, 6]
    data = [(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]
    ref = [local_update(m, params, x, y, spec, torch.Generator().manual_seed(10 + i)) for i, (x, y) in enumerate(data)]
    U, losses = vectorized_updates(m, params, data, spec, [torch.Generator().manual_seed(10 + i) for i in range(4)],
                                   [None] * 4)
    assert torch.allclose(U, torch.stack([r[0] for r in ref]), atol=1e-6, rtol=1e-5)
    assert losses == pytest.approx([r[1] for r in ref], rel=1e-5)


def test_gradients_in_chunks_of_clients_change_nothing(monkeypatch):
    import phalanx.training as training

    g = torch.Generator().manual_seed(1)
    m = build_model("mlp", (1, 8, 8), 10, seed=0)
    params = flatten_params(m)
    spec = LocalSpec(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)
    sizes = [5, 23, 40, 17, 9]  # unequal: later steps train a subset of the clients
    data = [(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]
    start = torch.randn(len(sizes), len(params), generator=g)

    def run():
        gens = [torch.Generator().manual_seed(10 + i) for i in range(len(sizes))]
        return training.vectorized_momentum_updates(m, params, data, spec, gens, [None] * len(sizes), start)

    whole = run()
    monkeypatch.setattr(training, "STEP_BYTES", 2 * len(params) * 4)  # two clients per call
    chunked = run()
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[2], chunked[2])
    assert whole[1] == chunked[1]
