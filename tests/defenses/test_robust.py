"""Robust aggregators: hand-worked cases, slow references, bounds, attacks, weights, state."""

import math

import numpy as np
import pytest
import torch

import phalanx.defenses  # noqa: F401  (registers the defenses)
from phalanx.context import simple_round_context
from phalanx.defenses import coordinate, iterative, robust
from phalanx.errors import BoundError, PhalanxError
from phalanx.registry import DEFENSES

DETERMINISTIC = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed",
                 "centered_clipping"]


def run(name, U, w=None, **params):
    agg = DEFENSES.build(name, **params)
    w = torch.ones(U.shape[0]) if w is None else w
    return agg(U, w, simple_round_context(U))


def attacked(n=20, f=4, d=30, seed=0, value=1e6):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    U = base + 0.1 * torch.randn(n, d, generator=gen)
    U[:f] = value
    return U, U[f:]


# ------------------------------------------------------------------ hand-worked cases

def test_median_by_hand_odd_and_even():
    U = torch.tensor([[1.0, 5.0, -2.0], [3.0, 0.0, 7.0], [2.0, 9.0, 4.0]])
    g, rep = run("median", U)
    assert g.tolist() == [2.0, 5.0, 4.0]
    assert rep.selected.all()
    g, _ = run("median", torch.tensor([[1.0], [4.0], [2.0], [10.0]]))
    assert g.tolist() == [3.0]  # mean of the two middle values


def test_trimmed_mean_by_hand():
    U = torch.tensor([[1.0, 0.0], [100.0, 1.0], [3.0, 2.0], [-50.0, 3.0], [2.0, 400.0]])
    g, _ = run("trimmed_mean", U, f=1)
    assert torch.allclose(g, torch.tensor([2.0, 2.0]))


def test_krum_and_multi_krum_by_hand():
    # points 0, 1, 2.5, 10, 11; f=1 -> each score sums the n - f - 2 = 2 nearest squared distances
    U = torch.tensor([[0.0], [1.0], [2.5], [10.0], [11.0]])
    g, rep = run("krum", U, f=1)
    assert g.tolist() == [1.0]
    assert torch.allclose(rep.scores, torch.tensor([7.25, 3.25, 8.5, 57.25, 73.25], dtype=torch.float64))
    assert rep.selected.tolist() == [False, True, False, False, False]
    g, rep = run("multi_krum", U, f=1, m=3)
    assert torch.allclose(g, torch.tensor([3.5 / 3]))
    assert rep.selected.tolist() == [True, True, True, False, False]
    g, rep = run("multi_krum", U, f=1)  # default m = n - f = 4
    assert torch.allclose(g, torch.tensor([13.5 / 4]))


def test_bulyan_by_hand():
    # n = 7, f = 1: theta = 5 rows by iterated Krum (drops the outlier 100 and then 9),
    # beta = 3 values closest to the median of {0, 1, 2, 3, 4}: {1, 2, 3} -> 2
    U = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [9.0], [100.0]])
    g, rep = run("bulyan", U, f=1)
    assert g.tolist() == [2.0]
    assert rep.selected.tolist() == [True] * 5 + [False, False]


# ------------------------------------------------------------------ slow references

def ref_krum_scores(U, f):
    U = U.double()
    n = U.shape[0]
    scores = []
    for i in range(n):
        ds = sorted(float(((U[i] - U[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(ds[: n - f - 2]))
    return torch.tensor(scores, dtype=torch.float64)


def ref_bulyan(U, f):
    n = U.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        sub = U[remaining]
        r = len(remaining)
        k = min(max(r - f - 2, 1), r - 1)
        sc = []
        for i in range(r):
            ds = sorted(float(((sub[i] - sub[j]) ** 2).sum()) for j in range(r) if j != i)
            sc.append(sum(ds[:k]))
        best = remaining[int(np.argmin(sc))]
        chosen.append(best)
        remaining.remove(best)
    S = U[sorted(chosen)].numpy()
    out = []
    for col in S.T:
        med = np.median(col)
        out.append(col[np.argsort(np.abs(col - med), kind="stable")[:beta]].mean())
    return torch.tensor(out, dtype=torch.float32), sorted(chosen)


def ref_weiszfeld(U, w, iters=2000):
    X = U.double().numpy()
    a = w.double().numpy() / w.double().sum().item()
    v = a @ X
    for _ in range(iters):
        dist = np.maximum(np.linalg.norm(X - v, axis=1), 1e-12)
        v = (a / dist) @ X / (a / dist).sum()
    return v


@pytest.mark.parametrize("n", [7, 10])
def test_median_and_trimmed_mean_match_reference(n):
    U = torch.randn(n, 40, generator=torch.Generator().manual_seed(n))
    g, _ = run("median", U)
    assert torch.allclose(g, torch.from_numpy(np.median(U.numpy(), axis=0)), atol=1e-6)
    f = 2
    g, _ = run("trimmed_mean", U, f=f)
    ref = torch.stack([torch.sort(U[:, j]).values[f:n - f].mean() for j in range(U.shape[1])])
    assert torch.allclose(g, ref, atol=1e-5)


def test_column_blocks_and_threads_match_reference(monkeypatch):
    """Force many tiny column blocks (and the thread pool) and compare with numpy."""
    n, d = 9, 1000
    U = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(coordinate, "_BLOCK_BYTES", 4 * n * 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g, _ = run("median", U)
        g2, _ = run("trimmed_mean", U, f=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(g, torch.from_numpy(np.median(U.numpy(), axis=0)).float())
    g = g2
    ref = torch.from_numpy(np.sort(U.numpy(), axis=0)[3:6].mean(0))
    assert torch.allclose(g, ref, atol=1e-6)


def test_krum_scores_match_pairwise_loop():
    U = torch.randn(12, 25, generator=torch.Generator().manual_seed(3))
    _, rep = run("krum", U, f=3)
    assert torch.allclose(rep.scores, ref_krum_scores(U, 3), rtol=1e-9, atol=1e-9)
    g, rep = run("multi_krum", U, f=3, m=5)
    chosen = torch.argsort(ref_krum_scores(U, 3))[:5]
    assert torch.allclose(g, U[chosen].mean(0), atol=1e-6)


def test_bulyan_matches_reference():
    U = torch.randn(15, 20, generator=torch.Generator().manual_seed(4))
    g, rep = run("bulyan", U, f=3)
    ref, chosen = ref_bulyan(U, 3)
    assert torch.nonzero(rep.selected).flatten().tolist() == chosen
    assert torch.allclose(g, ref, atol=1e-6)


def test_geomed_matches_weiszfeld_and_minimises_objective():
    U = torch.randn(9, 6, generator=torch.Generator().manual_seed(5))
    w = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 0.5, 1.0, 2.0])
    g, rep = run("geomed", U, w, iterations=1000, tol=1e-12)
    ref = ref_weiszfeld(U, w)
    assert np.allclose(g.double().numpy(), ref, atol=1e-4)
    a = (w / w.sum()).double()

    def obj(v):
        return float((a * (U.double() - v.double()).norm(dim=1)).sum())

    assert obj(g) <= obj((a.float() @ U)) + 1e-9
    assert all(obj(g) <= obj(U[i]) + 1e-9 for i in range(9))
    assert rep.info["iterations"] >= 1


def test_centered_clipping_matches_loop_and_keeps_center():
    U = torch.randn(8, 5, generator=torch.Generator().manual_seed(6)) * 3
    tau, L = 1.5, 3
    agg = DEFENSES.build("centered_clipping", tau=tau, iterations=L)
    ctx = simple_round_context(U)
    g1, rep = agg(U, torch.ones(8), ctx)

    def ref(v):
        for _ in range(L):
            step = torch.zeros_like(v)
            for x in U:
                diff = x - v
                step += diff * min(1.0, tau / float(diff.norm()))
            v = v + step / len(U)
        return v

    assert torch.allclose(g1, ref(torch.zeros(5)), atol=1e-5)
    g2, _ = agg(U, torch.ones(8), ctx)
    assert torch.allclose(g2, ref(g1), atol=1e-5)  # second round starts from the first aggregate
    assert rep.info["clipped"] > 0


def test_centered_clipping_state_round_trip():
    U = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))
    a = DEFENSES.build("centered_clipping", tau=0.5)
    ctx = simple_round_context(U)
    a(U, torch.ones(6), ctx)
    state = a.state_dict()
    b = DEFENSES.build("centered_clipping", tau=0.5)
    b.load_state_dict(state)
    assert torch.equal(a(U, torch.ones(6), ctx)[0], b(U, torch.ones(6), ctx)[0])
    with pytest.raises(PhalanxError, match="center"):
        b.load_state_dict({"momentum": torch.zeros(4)})
    b.load_state_dict({"center": torch.zeros(3)})
    with pytest.raises(PhalanxError, match="d=3"):
        b(U, torch.ones(6), ctx)


# ------------------------------------------------------------------ under attack

def test_coordinatewise_rules_stay_inside_honest_range():
    U, H = attacked()
    lo, hi = H.min(0).values, H.max(0).values
    for name in ["median", "trimmed_mean", "bulyan"]:
        g, _ = run(name, U, f=4)
        assert bool(((g >= lo) & (g <= hi)).all()), name


def test_krum_selects_only_honest_rows():
    U, _ = attacked()
    for name in ["krum", "multi_krum"]:
        _, rep = run(name, U, f=4)
        assert not rep.selected[:4].any(), name
    _, rep = run("multi_krum", U, f=4)
    assert rep.selected[4:].all()


@pytest.mark.parametrize("name,bound", [("bulyan", 0.3), ("geomed", 0.3),
                                        ("centered_clipping", 2.5 * 4 / 20 + 0.1),
                                        ("multi_krum", 1e-5)])
def test_stays_close_to_honest_mean(name, bound):
    # honest rows: 0.1 per coordinate, radius ~0.1 * sqrt(30) = 0.55 around their mean; the bound
    # 0.3 is about half that radius. CC with tau = 2.5 moves at most tau * f / n per iteration.
    U, H = attacked()
    params = {"tau": 2.5, "iterations": 1} if name == "centered_clipping" else {}
    g, _ = run(name, U, f=4, **params)
    if name == "centered_clipping":  # from a center at the honest mean (as after warm-up)
        agg = DEFENSES.build(name, tau=2.5, iterations=1)
        agg.load_state_dict({"center": H.mean(0)})
        g, _ = agg(U, torch.ones(20), simple_round_context(U))
    assert float((g - H.mean(0)).norm()) <= bound, name


def test_mean_is_broken_by_one_outlier():
    U, H = attacked(f=1)
    g, _ = run("mean", U)
    assert float((g - H.mean(0)).norm()) > 1e3


# ------------------------------------------------------------------ properties

@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permutation_invariance(name):
    U = torch.randn(15, 12, generator=torch.Generator().manual_seed(8))
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(9))
    params = {} if name in ("mean", "median") else {"f": 3}
    g1, r1 = run(name, U, **params)
    ctx = simple_round_context(U[perm])
    ctx.client_ids = [f"c{i}" for i in perm.tolist()]
    g2, r2 = DEFENSES.build(name, **params)(U[perm], torch.ones(15), ctx)
    assert torch.allclose(g1, g2, atol=1e-6), name
    assert torch.equal(r1.selected[perm], r2.selected)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_zero_weight_rows_are_ignored(name):
    U = torch.randn(16, 10, generator=torch.Generator().manual_seed(10))
    w = torch.ones(16)
    w[[2, 7, 11]] = 0.0
    U_dirty = U.clone()
    U_dirty[[2, 7, 11]] = 1e9
    keep = w > 0
    params = {} if name in ("mean", "median") else {"f": 2}
    g1, r1 = run(name, U_dirty, w, **params)
    g2, _ = run(name, U[keep], **params)
    assert torch.allclose(g1, g2, atol=1e-6), name
    assert not r1.selected[[2, 7, 11]].any()
    assert r1.n == 16


def test_mean_is_weighted():
    U = torch.tensor([[0.0, 0.0], [4.0, 8.0]])
    g, rep = run("mean", U, torch.tensor([3.0, 1.0]))
    assert g.tolist() == [1.0, 2.0]
    assert rep.scores.tolist() == [0.75, 0.25]


@pytest.mark.parametrize("name,n,f,msg", [
    ("krum", 8, 3, "krum: needs n > 2f + 2 clients, got n=8, f=3"),
    ("multi_krum", 6, 2, "multi_krum: needs n > 2f + 2 clients, got n=6, f=2"),
    ("bulyan", 10, 2, "bulyan: needs n >= 4f + 3 clients, got n=10, f=2"),
    ("trimmed_mean", 6, 3, "trimmed_mean: needs n > 2f clients, got n=6, f=3"),
])
def test_bounds_raise_bound_error_naming_n_and_f(name, n, f, msg):
    U = torch.randn(n, 4)
    with pytest.raises(BoundError) as e:
        run(name, U, f=f)
    assert str(e.value) == msg


# each f-parametrised rule: (name, f, the fewest active rows it accepts, the rule in its message)
BOUNDS = [("median", 2, 5, "n > 2f"), ("median", 0, 1, "n > 2f"), ("trimmed_mean", 2, 5, "n > 2f"),
          ("krum", 2, 7, "n > 2f + 2"), ("multi_krum", 2, 7, "n > 2f + 2"),
          ("bulyan", 2, 11, "n >= 4f + 3"), ("geomed", 2, 5, "n > 2f"),
          ("centered_clipping", 2, 5, "n > 2f"), ("krum", 1, 5, "n > 2f + 2"), ("bulyan", 1, 7, "n >= 4f + 3")]


@pytest.mark.parametrize("name,f,least,rule", BOUNDS)
def test_each_rule_accepts_its_bound_and_refuses_one_row_less(name, f, least, rule):
    U = torch.randn(least, 3, generator=torch.Generator().manual_seed(least))
    g, _ = run(name, U, f=f)  # just inside
    assert g.shape == (3,) and bool(torch.isfinite(g).all())
    if least == 1:
        return  # f = 0: no row count is too small but zero, which prepare refuses on its own
    with pytest.raises(BoundError) as e:  # just outside, checked at the first call
        run(name, U[:-1], f=f)
    assert str(e.value) == f"{name}: needs {rule} clients, got n={least - 1}, f={f}"


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "geomed", "centered_clipping"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_a_byzantine_half_or_more_is_refused_not_aggregated(name, fraction):
    n = 10
    f = int(fraction * n)
    agg = DEFENSES.build(name, f=f)  # construction only checks f >= 0
    U = torch.randn(n, 4)
    with pytest.raises(BoundError, match=rf"^{name}: needs n > 2f clients, got n=10, f={f}$"):
        agg(U, torch.ones(n), simple_round_context(U))


def test_bounds_use_active_rows_with_the_same_f():
    # rows earlier layers rejected do not lower f: they may have been honest ones
    U = torch.randn(7, 4)
    w = torch.ones(7)
    run("median", U, w, f=3)  # 7 > 6
    w[0] = 0.0
    with pytest.raises(BoundError, match="median: needs n > 2f clients, got n=6, f=3"):
        run("median", U, w, f=3)


def test_multi_krum_m_larger_than_active_rows():
    with pytest.raises(PhalanxError, match="m must be <= the number of active clients, got m=6, n=5"):
        run("multi_krum", torch.randn(5, 2), f=1, m=6)


def test_bounds_count_active_rows_only():
    U = torch.randn(9, 4)
    w = torch.ones(9)
    w[:2] = 0  # 7 active rows < 2f + 3 = 9
    with pytest.raises(BoundError, match="n=7, f=3"):
        run("krum", U, w, f=3)


@pytest.mark.parametrize("name,params,param", [
    ("krum", {"f": -1}, "f"), ("trimmed_mean", {"f": 1.5}, "f"), ("bulyan", {"f": True}, "f"),
    ("multi_krum", {"f": 1, "m": 0}, "m"), ("median", {"f": -2}, "f"),
    ("centered_clipping", {"tau": 0}, "tau"), ("centered_clipping", {"tau": -1.0}, "tau"),
    ("centered_clipping", {"iterations": 0}, "iterations"), ("geomed", {"nu": 0}, "nu"),
    ("geomed", {"iterations": 0}, "iterations"), ("geomed", {"tol": -1}, "tol"),
])
def test_factories_reject_bad_hyperparameters_at_once(name, params, param):
    with pytest.raises(PhalanxError, match=f"{name}: {param} must be"):
        DEFENSES.build(name, **params)


def test_bad_inputs_get_clear_errors():
    agg = DEFENSES.build("median")
    U = torch.randn(4, 3)
    ctx = simple_round_context(U)
    with pytest.raises(PhalanxError, match="shape"):
        agg(U[0], torch.ones(4), ctx)
    with pytest.raises(PhalanxError, match=r"w must have shape \[4\]"):
        agg(U, torch.ones(3), ctx)
    with pytest.raises(PhalanxError, match=">= 0"):
        agg(U, torch.tensor([1.0, -1.0, 1.0, 1.0]), ctx)
    with pytest.raises(PhalanxError, match="every row has weight 0"):
        agg(U, torch.zeros(4), ctx)
    V = U.clone()
    V[0, 0] = math.nan
    with pytest.raises(PhalanxError, match="non-finite"):
        DEFENSES.build("mean")(V, torch.ones(4), ctx)


@pytest.mark.parametrize("name", ["dnc", "flame"])
def test_rules_that_cannot_skip_nan_rows_name_them(name):
    U = torch.randn(8, 5)
    U[2, 1], U[6, 0] = math.nan, math.inf
    with pytest.raises(PhalanxError, match=rf"{name}: rows \[2, 6\] have NaN/inf values; put the 'validate'"):
        run(name, U, f=2)
    w = torch.ones(8)
    w[[2, 6]] = 0  # rows a layer already rejected are not checked
    g, _ = run(name, U, w, f=2)
    assert bool(torch.isfinite(g).all())


def test_median_tolerates_a_minority_of_nan_rows():
    U, H = attacked(n=9, f=3, value=math.nan)
    g, _ = run("median", U)
    assert bool(torch.isfinite(g).all())
    assert bool(((g >= H.min(0).values) & (g <= H.max(0).values)).all())


def test_centered_clipping_auto_tau_is_the_median_distance():
    g = torch.Generator().manual_seed(3)
    U = torch.randn(9, 20, generator=g)
    U[:2] = 1e6  # far outliers
    auto = DEFENSES.build("centered_clipping", tau="auto", iterations=1)
    out, rep = auto(U, torch.ones(9), simple_round_context(U))
    med = float(U.double().norm(dim=1).median())  # the first center is 0
    fixed = DEFENSES.build("centered_clipping", tau=med, iterations=1)
    ref, _ = fixed(U, torch.ones(9), simple_round_context(U))
    assert rep.info["tau"] == pytest.approx(med) and torch.allclose(out, ref)
    assert float(out.norm()) <= med + 1e-4  # the outliers moved it by at most tau
    with pytest.raises(PhalanxError, match="tau"):
        DEFENSES.build("centered_clipping", tau="median")


# ------------------------------------------------------------------ fast paths against float64

def big(n=30, d=20000, seed=11, offset=3.0):
    """Large enough (n^2 d > 2^24) for the float32 Gram path, with a shared offset."""
    g = torch.Generator().manual_seed(seed)
    return offset + torch.randn(n, d, generator=g)


def exact_scores(U, f):
    A = U.double()
    D = ((A[:, None, :] - A[None, :, :]) ** 2).sum(-1)
    n = U.shape[0]
    k = min(max(n - f - 2, 1), n - 1)
    D.fill_diagonal_(float("inf"))
    return torch.sort(D, dim=1).values[:, :k].sum(1)


def near_tie(U, f, seed, eps):
    """U with its Krum winner copied to the last row and nudged by eps along a random direction:
    the two rows' scores then differ by ~1e-9 of their size, far below what float32 resolves."""
    a = int(torch.argmin(exact_scores(U, f)))
    v = torch.randn(U.shape[1], generator=torch.Generator().manual_seed(seed))
    V = U.clone()
    V[-1] = U[a] + eps * v / v.norm()
    return V, a


@pytest.mark.parametrize("seed", range(4))
def test_krum_near_ties_choose_what_float64_chooses(seed):
    U = big(seed=seed)
    f = 5
    for eps in (3e-4, -3e-4, 1e-5):
        V, a = near_tie(U, f, seed, eps)
        ref = exact_scores(V, f)
        order = torch.argsort(ref, stable=True)
        top = ref[order[:2]]
        assert float((top[1] - top[0]) / top[0]) < 1e-6  # a near tie float32 cannot settle
        g, rep = run("krum", V, f=f)
        assert torch.nonzero(rep.selected).flatten().tolist() == [int(order[0])]
        assert torch.equal(g, V[order[0]])
        assert rep.info["rechecked"] >= 1
        assert torch.allclose(rep.scores[order[:2]], ref[order[:2]], rtol=1e-12)
        for m in (int((order == a).nonzero()) + 1, int((order == V.shape[0] - 1).nonzero()) + 1):
            _, rep = run("multi_krum", V, f=f, m=m)  # the cut between the two nearly tied rows
            assert torch.nonzero(rep.selected).flatten().tolist() == sorted(order[:m].tolist())


def test_krum_float32_path_agrees_with_float64_on_random_rows():
    for seed in range(3):
        U = big(seed=20 + seed, offset=0.0)
        ref = exact_scores(U, 4)
        _, rep = run("krum", U, f=4)
        assert torch.nonzero(rep.selected).flatten().tolist() == [int(torch.argsort(ref, stable=True)[0])]
        assert torch.allclose(rep.scores, ref, rtol=1e-5)
        g, rep = run("multi_krum", U, f=4)
        assert torch.nonzero(rep.selected).flatten().tolist() == sorted(torch.argsort(ref, stable=True)[:26].tolist())
        assert torch.allclose(g, U[rep.selected].mean(0), atol=1e-6)


def test_copies_of_the_best_row_tie_exactly_and_the_lowest_index_wins():
    U = big(seed=5)
    a = int(torch.argmin(exact_scores(U, 4)))
    V = U.clone()
    for i in (2, 9, 17):
        V[i] = U[a]
    ref = exact_scores(V, 4)
    best = int(torch.argsort(ref, stable=True)[0])
    _, rep = run("krum", V, f=4)
    assert torch.nonzero(rep.selected).flatten().tolist() == [best] == [min(2, a)]


def test_a_nan_row_left_out_cannot_spoil_krum_or_multi_krum():
    U = big(seed=6)
    U[3, 7] = float("nan")
    for name, params in (("krum", {}), ("multi_krum", {"m": 10})):
        g, rep = run(name, U, f=4, **params)
        assert bool(torch.isfinite(g).all()) and not bool(rep.selected[3]), name


def test_bulyan_matches_reference_with_copied_attack_rows():
    # identical attack rows put equal values at the edge of the beta window: the closest-beta
    # rule (not the least max-distance window) is the one the float64 reference applies
    g = torch.Generator().manual_seed(8)
    base = torch.randn(60, generator=g)
    U = base + torch.randn(23, 60, generator=g)
    U[:5] = -3 * base
    got, rep = run("bulyan", U, f=5)
    ref, chosen = ref_bulyan(U, 5)
    assert torch.nonzero(rep.selected).flatten().tolist() == chosen
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_bulyan_float64_selection_matches_reference_on_large_rows(seed):
    g = torch.Generator().manual_seed(30 + seed)
    base = torch.randn(4000, generator=g)
    U = base + torch.randn(19, 4000, generator=g)
    U[:4] = -3 * base
    got, rep = run("bulyan", U, f=4)
    ref, chosen = ref_bulyan(U, 4)
    assert torch.nonzero(rep.selected).flatten().tolist() == chosen
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("name,params", [("geomed", {}), ("centered_clipping", {}),
                                         ("centered_clipping", {"tau": 30.0})])
def test_gram_iterations_agree_with_passes_over_u(monkeypatch, name, params):
    U = big(n=12, d=30000, seed=9)
    U[:2] *= 40  # far rows, so that weights and clipping matter
    w = torch.ones(12)
    w[5] = 0
    outs = []
    for gram in (True, False):
        monkeypatch.setattr(iterative, "use_gram", lambda n, passes, gram=gram: gram)
        agg = DEFENSES.build(name, f=2, **params)
        ctx = simple_round_context(U)
        g1, rep = agg(U, w, ctx)
        g2, _ = agg(U, w, ctx)  # centered clipping: the second round starts from the first
        outs.append((g1, g2, rep))
    (a1, a2, ra), (b1, b2, rb) = outs
    tol = 1e-4 * float(U.abs().max()) if name == "geomed" else 1e-5 * float(U.abs().max())
    assert float((a1 - b1).abs().max()) <= tol and float((a2 - b2).abs().max()) <= tol
    assert torch.allclose(ra.scores.nan_to_num(), rb.scores.nan_to_num(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed",
                                  "centered_clipping", "mean"])
def test_results_do_not_depend_on_the_thread_count(name):
    U = big(n=20, d=60000, seed=12)
    w = torch.ones(20)
    w[4] = 0
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(run(name, U, w, **({} if name == "mean" else {"f": 3}))[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), name


def test_coordinate_rules_on_a_subset_of_rows_match_numpy():
    U = big(n=25, d=9000, seed=13)
    w = torch.ones(25)
    w[[0, 7, 8]] = 0
    keep = (w > 0).numpy()
    A = U.numpy()[keep]
    g, _ = run("median", U, w)
    assert torch.equal(g, torch.from_numpy(np.median(A, axis=0)).float())
    g, _ = run("trimmed_mean", U, w, f=3)
    assert torch.allclose(g, torch.from_numpy(np.sort(A, axis=0)[3:-3].mean(0)).float(), atol=1e-5)


@pytest.mark.parametrize("n", [3, 10, 24])
def test_sorting_network_path_matches_numpy_with_nan_and_inf(n):
    U = torch.randn(n, 3000, generator=torch.Generator().manual_seed(n))
    U[0, :50] = math.nan  # one NaN row sorts last, like +inf
    U[1, 50:60] = math.inf
    U[2, 60:70] = -math.inf
    A = np.where(np.isnan(U.numpy()), np.inf, U.numpy())
    g, _ = robust.Median(0)(U, torch.ones(n), simple_round_context(U)) if n >= 3 else (None, None)
    S = np.sort(A, axis=0)
    ref = (S[(n - 1) // 2] + S[n // 2]) * np.float32(0.5)
    assert np.array_equal(g.numpy()[100:], ref[100:])
    f = 1 if n < 10 else 3
    out = robust.sorted_column_map(U, lambda S: S[:, f:n - f].sum(1) / S.dtype.type(n - 2 * f))
    assert np.allclose(out.numpy()[100:], S[f:n - f, 100:].mean(0), atol=1e-5)


@pytest.mark.parametrize("seed,n,f", [(0, 15, 3), (1, 15, 3), (2, 43, 8)])
def test_bulyan_quantized_rows_break_distance_ties_like_the_reference(seed, n, f):
    # values on a 0.25 grid: many coordinates have two values exactly as far from the median on
    # either side of it, where the closest-beta set depends on row order (theta = 9 runs the
    # sorting network, theta = 27 the sort)
    g = torch.Generator().manual_seed(60 + seed)
    U = torch.round(torch.randn(n, 300, generator=g) * 4) / 4
    got, rep = run("bulyan", U, f=f)
    ref, chosen = ref_bulyan(U, f)
    assert torch.nonzero(rep.selected).flatten().tolist() == chosen
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("theta,beta", [(60, 20), (11, 3), (7, 7), (5, 1), (8, 4), (9, 1), (300, 100)])
def test_bulyan_kernel_is_the_closest_beta_mean(theta, beta):
    rng = np.random.default_rng(theta * 31 + beta)
    S = np.sort(rng.standard_normal((400, theta)).astype(np.float32), axis=1)
    got = robust.bulyan_kernel(theta, beta)(S)
    ref = []
    for row in S.astype(np.float64):
        med = np.median(row)
        ref.append(row[np.argsort(np.abs(row - med), kind="stable")[:beta]].mean())
    assert np.allclose(got, ref, atol=3e-7)
