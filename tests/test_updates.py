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


# ------------------------------------------------------------------ Gram matrices and distances

def _direct(U):
    A = U.double()
    return ((A[:, None, :] - A[None, :, :]) ** 2).sum(-1)


def _structured(kind, n=9, d=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian_offset":
        return 100 + torch.randn(n, d, generator=g)
    if kind == "constant_rows":  # equal terms: float32 sums drift the most
        return (torch.arange(n, dtype=torch.float32)[:, None] / 3 + 1 / 3).expand(n, d).contiguous()
    if kind == "signs":
        return torch.sign(torch.randn(n, d, generator=g)) * 0.01
    if kind == "heavy_tails":
        return torch.exp(3 * torch.randn(n, d, generator=g))
    if kind == "tiny":  # products would underflow float32 without scaling
        return 1e-30 * torch.randn(n, d, generator=g)
    if kind == "huge":  # products would overflow float32 without scaling
        return 1e30 * torch.randn(n, d, generator=g)
    if kind == "near_copies":  # distances far below the norms: cancellation
        return torch.randn(d, generator=g) + 1e-3 * torch.randn(n, d, generator=g)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gaussian_offset", "constant_rows", "signs", "heavy_tails", "tiny", "huge",
                                  "near_copies"])
def test_float32_distances_stay_within_their_proven_bound(kind):
    from phalanx.updates import Gram

    U = _structured(kind)
    ref = _direct(U)
    g = Gram(U)  # float32 products (Distances would use float64 at this small size)
    D, E = g.sq_dists(), g.bound()
    assert bool(((D - ref).abs() <= E + 1e-300).all()), float(((D - ref).abs() / E.clamp_min(1e-300)).max())


def test_exact_rows_match_direct_float64_and_refine_makes_rows_exact():
    from phalanx.updates import Distances, Gram

    g = torch.Generator().manual_seed(1)
    U = 50 + torch.randn(12, 30000, generator=g)
    U[7] = U[3]  # a bit-for-bit copy: exactly 0 apart after refining
    ref = _direct(U)
    gram = Gram(U)
    rows = gram.exact_rows(torch.tensor([0, 5]))
    assert torch.allclose(rows, ref[[0, 5]], rtol=1e-12, atol=1e-9)
    dist = Distances(U)
    dist.refine([3])
    assert bool(dist.exact[[3, 7]].all()) and float(dist.D[3, 7]) == 0.0
    assert torch.equal(dist.D[3], dist.D[7]) and bool((dist.E[[3, 7]] == 0).all())
    assert torch.allclose(dist.D[3], ref[3], rtol=1e-12, atol=1e-9)


def test_non_finite_rows_are_flagged_and_infinitely_far():
    from phalanx.updates import Gram

    U = torch.randn(6, 40000)
    U[2, 5] = float("nan")
    U[4, 100] = float("inf")
    g = Gram(U)
    assert g.bad.tolist() == [False, False, True, False, True, False]
    D = g.sq_dists()
    assert bool(torch.isinf(D[2, [0, 1, 3, 5]]).all()) and float(D[2, 2]) == 0.0
    ok = [0, 1, 3, 5]
    assert torch.allclose(D[ok][:, ok], _direct(U[ok]), rtol=1e-5)


def test_row_passes_and_combine():
    from phalanx.updates import combine, row_sq_dists, row_sq_norms

    g = torch.Generator().manual_seed(2)
    U = torch.randn(7, 70000, generator=g)
    v = U[3] + 1e-3
    A = U.double()
    assert torch.allclose(row_sq_dists(U, v), ((A - v.double()) ** 2).sum(1), rtol=1e-5)
    assert torch.allclose(row_sq_dists(U, v, torch.tensor([1, 3])), ((A[[1, 3]] - v.double()) ** 2).sum(1), rtol=1e-5)
    assert torch.allclose(row_sq_norms(U), (A ** 2).sum(1), rtol=1e-6)
    U[5, 9] = float("nan")
    coef = torch.tensor([0.2, 0.0, 0.3, 0.1, 0.4, 0.0, 0.0], dtype=torch.float64)
    got = combine(coef, U)  # the NaN row has a zero coefficient: never read
    assert bool(torch.isfinite(got).all())
    assert torch.allclose(got.double(), coef @ torch.nan_to_num(A), atol=1e-5)
    assert torch.equal(combine(torch.tensor([1.0], dtype=torch.float64), U, torch.tensor([2])), U[2])
    assert not bool(torch.isfinite(row_sq_norms(U))[5])


def test_new_matrix_is_a_plain_writable_tensor():
    from phalanx.updates import new_matrix

    M = new_matrix(100, 200_000)
    assert M.shape == (100, 200_000) and M.dtype == torch.float32 and M.is_contiguous()
    M.fill_(2.0)
    assert float(M.sum()) == 2.0 * 100 * 200_000


def test_row_dots_one_pass_matches_float64():
    from phalanx.updates import row_dots, row_sq_norms

    g = torch.Generator().manual_seed(3)
    U = 2.0 + torch.randn(9, 50_003, generator=g)
    v = torch.randn(50_003, generator=g)
    A, v64 = U.double(), v.double()
    sq, dots = row_dots(U, v)
    assert torch.equal(sq, row_sq_norms(U))  # the same squares, bit for bit
    scale = A.norm(dim=1) * v64.norm()
    assert float(((dots - A @ v64).abs() / scale).max()) < 1e-6
    rows = torch.tensor([7, 2, 4])
    sq_r, dots_r = row_dots(U, v, rows)
    assert torch.allclose(sq_r, sq[rows], rtol=1e-6) and torch.allclose(dots_r, dots[rows], rtol=1e-6)
    assert row_dots(U)[1] is None
    U[1, 5] = 1e30  # products overflow float32: redone in float64
    U[4, 8] = float("nan")
    sq, dots = row_dots(U, v)
    A = U.double()
    assert sq[1] == pytest.approx(float(A[1] @ A[1])) and dots[1] == pytest.approx(float(A[1] @ v64))
    assert not bool(torch.isfinite(sq[4])) and not bool(torch.isfinite(dots[4]))
