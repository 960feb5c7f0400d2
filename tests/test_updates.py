import pytest
import torch

from phalanx.errors import PhalanxError
from phalanx.models import build_model
from phalanx.updates import cosine_matrix, flatten_params, load_flat, num_params, pairwise_sq_dists


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn", "lenet"])
def test_flat_round_trip(name):
    m = build_model(name, (1, 28, 28), 10, seed=0)
    v = flatten_params(m)
    assert v.shape == (num_params(m),) and v.dtype == torch.float32
    load_flat(m, v * 2)
    assert torch.equal(flatten_params(m), v * 2)
    with pytest.raises(PhalanxError, match=f"expected a vector of {v.numel()} values"):
        load_flat(m, v[:-1])


def test_models_seeded():
    a, b = build_model("cnn", (1, 28, 28), 10, 5), build_model("cnn", (1, 28, 28), 10, 5)
    assert torch.equal(flatten_params(a), flatten_params(b))
    assert not torch.equal(flatten_params(a), flatten_params(build_model("cnn", (1, 28, 28), 10, 6)))


def test_pairwise_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(7, 50, generator=g) * 1e3 + 5e3  # large common offset: cancellation-prone
    D = pairwise_sq_dists(U)
    ref = torch.tensor([[float(((U[i].double() - U[j].double()) ** 2).sum()) for j in range(7)] for i in range(7)], dtype=torch.float64)
    assert torch.allclose(D, ref, rtol=1e-9, atol=1e-3)
    assert (D >= 0).all() and torch.all(D.diagonal() == 0)
    C = cosine_matrix(U)
    assert torch.allclose(C.diagonal(), torch.ones(7, dtype=torch.float64))
