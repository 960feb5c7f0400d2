"""Pre-aggregation: NNM (layer), bucketing (wrapper) and DnC."""

import math

import numpy as np
import pytest
import torch

import phalanx.defenses  # noqa: F401
from phalanx.context import simple_round_context
from phalanx.defenses.base import Aggregator, Layer
from phalanx.errors import BoundError, ConfigError, PhalanxError
from phalanx.registry import DEFENSES


def attacked(n=20, f=4, d=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    U = base + 0.1 * torch.randn(n, d, generator=gen)
    U[:f] = -5.0 * base  # a consistent direction, far from the honest rows
    return U, U[f:]


# ------------------------------------------------------------------ NNM

def test_nnm_by_hand():
    U = torch.tensor([[0.0], [1.0], [10.0]])
    layer = DEFENSES.build("nnm", f=1)
    assert isinstance(layer, Layer)
    V, w, rep = layer(U, torch.ones(3), simple_round_context(U))
    assert V.flatten().tolist() == [0.5, 0.5, 5.5]
    assert w.tolist() == [1.0, 1.0, 1.0]
    assert rep.selected.all() and rep.info["neighbours"] == 2


def test_nnm_matches_loop_reference():
    U = torch.randn(11, 8, generator=torch.Generator().manual_seed(1))
    f = 3
    V, _, _ = DEFENSES.build("nnm", f=f)(U, torch.ones(11), simple_round_context(U))
    ref = torch.empty_like(U)
    for i in range(11):
        dists = [float(((U[i].double() - U[j].double()) ** 2).sum()) for j in range(11)]
        near = np.argsort(dists, kind="stable")[: 11 - f]
        ref[i] = U[near].mean(0)
    assert torch.allclose(V, ref, atol=1e-6)


def test_nnm_keeps_zero_weight_rows_unchanged():
    U = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    w = torch.ones(8)
    w[[1, 4]] = 0
    V, w2, rep = DEFENSES.build("nnm", f=2)(U, w, simple_round_context(U))
    assert V.shape == U.shape and torch.equal(w2, w)
    assert torch.equal(V[[1, 4]], U[[1, 4]])
    keep = w > 0
    V2, _, _ = DEFENSES.build("nnm", f=2)(U[keep], torch.ones(6), simple_round_context(U[keep]))
    assert torch.allclose(V[keep], V2)
    assert not rep.selected[[1, 4]].any()


def test_nnm_then_mean_resists_attack():
    U, H = attacked()
    ctx = simple_round_context(U)
    V, w, _ = DEFENSES.build("nnm", f=4)(U, torch.ones(20), ctx)
    g, _ = DEFENSES.build("mean")(V, w, ctx)
    # honest rows mix only honest neighbours; each Byzantine row mixes at most 4 Byzantine rows
    # out of 16, so its pull on the mean is (4/20) * (4/16) of the honest-Byzantine gap.
    gap = float((U[0] - H.mean(0)).norm())
    assert float((g - H.mean(0)).norm()) <= 0.06 * gap
    assert torch.allclose(V[4:], H.mean(0).expand(16, -1), atol=1e-5)


def test_nnm_bound_and_hyperparameters():
    U = torch.randn(3, 4)
    with pytest.raises(BoundError, match=r"nnm: needs n > 2f clients, got n=3, f=2"):
        DEFENSES.build("nnm", f=2)(U, torch.ones(3), simple_round_context(U))
    V, _, _ = DEFENSES.build("nnm", f=1)(U, torch.ones(3), simple_round_context(U))  # 3 > 2
    assert V.shape == U.shape
    with pytest.raises(PhalanxError, match="nnm: f must be"):
        DEFENSES.build("nnm", f=-1)


# ------------------------------------------------------------------ bucketing

def test_bucketing_s1_with_mean_is_the_mean():
    U = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    g, rep = DEFENSES.build("bucketing", s=1)(U, torch.ones(7), simple_round_context(U))
    assert torch.allclose(g, U.mean(0), atol=1e-6)
    assert sorted(sum(rep.info["buckets"], [])) == list(range(7))


def test_bucketing_matches_reference_shuffle():
    U = torch.randn(9, 6, generator=torch.Generator().manual_seed(4))
    agg = DEFENSES.build("bucketing", s=2, aggregator="median")
    assert isinstance(agg, Aggregator)
    g, rep = agg(U, torch.ones(9), simple_round_context(U, seed=11))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(11))
    buckets = [perm[i:i + 2] for i in range(0, 9, 2)]
    means = torch.stack([U[b].mean(0) for b in buckets])
    assert torch.allclose(g, means.median(0).values, atol=1e-6)  # 5 buckets: odd, plain median
    assert rep.info["buckets"] == [b.tolist() for b in buckets]
    g2, _ = agg(U, torch.ones(9), simple_round_context(U, seed=11))
    assert torch.equal(g, g2)  # deterministic under the same seed


def test_bucketing_passes_f_to_the_inner_rule_and_maps_selection_back():
    U, H = attacked(n=24, f=2)
    agg = DEFENSES.build("bucketing", s=2, aggregator="multi_krum", f=2)
    g, rep = agg(U, torch.ones(24), simple_round_context(U))
    inner = rep.info["inner"]
    assert inner.n == 12 and int(inner.selected.sum()) == 10
    for b, rows in enumerate(rep.info["buckets"]):
        assert all(bool(rep.selected[r]) == bool(inner.selected[b]) for r in rows)
    assert not rep.selected[:2].any()  # the buckets holding Byzantine rows were dropped
    assert float((g - H.mean(0)).norm()) < 0.3


def test_bucketing_errors():
    with pytest.raises(PhalanxError, match="bucketing: s"):
        DEFENSES.build("bucketing", s=0)
    with pytest.raises(PhalanxError, match="krum: f must be"):
        DEFENSES.build("bucketing", aggregator="krum", f=-1)
    with pytest.raises(ConfigError, match="unknown defense"):
        DEFENSES.build("bucketing", aggregator="krumm")
    with pytest.raises(PhalanxError, match="Aggregator"):
        DEFENSES.build("bucketing", aggregator="nnm")
    U = torch.randn(12, 3)  # 6 buckets, krum with f=2 needs more than 6
    with pytest.raises(BoundError, match="got n=6, f=2"):
        DEFENSES.build("bucketing", aggregator="krum", f=2)(U, torch.ones(12), simple_round_context(U))


def test_bucketing_forwards_state_of_a_stateful_inner_rule():
    U = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    agg = DEFENSES.build("bucketing", aggregator="centered_clipping", tau=0.1)
    agg(U, torch.ones(6), simple_round_context(U))
    state = agg.state_dict()
    assert state["center"] is not None
    other = DEFENSES.build("bucketing", aggregator="centered_clipping", tau=0.1)
    other.load_state_dict(state)
    ctx = simple_round_context(U, seed=2)
    assert torch.equal(agg(U, torch.ones(6), ctx)[0],
                       other(U, torch.ones(6), simple_round_context(U, seed=2))[0])


# ------------------------------------------------------------------ DnC

def test_dnc_matches_full_svd_reference_when_sampling_every_coordinate():
    U = torch.randn(12, 10, generator=torch.Generator().manual_seed(6))
    U[:2] += 3.0 * torch.randn(10, generator=torch.Generator().manual_seed(7))
    g, rep = DEFENSES.build("dnc", f=2, b=100, iterations=3)(U, torch.ones(12), simple_round_context(U))
    X = U.double().numpy()
    Xc = X - X.mean(0)
    v = np.linalg.svd(Xc, full_matrices=False)[2][0]
    score = (Xc @ v) ** 2
    removed = set(np.argsort(-score)[:2].tolist())
    keep = [i for i in range(12) if i not in removed]
    assert torch.nonzero(~rep.selected).flatten().tolist() == sorted(removed)
    assert torch.allclose(g, U[keep].mean(0), atol=1e-6)
    assert np.allclose(rep.scores.numpy(), score)


def test_dnc_removes_attackers_and_is_deterministic():
    U, H = attacked(n=20, f=4, d=200)
    agg = DEFENSES.build("dnc", f=4, b=50)
    g, rep = agg(U, torch.ones(20), simple_round_context(U, seed=1))
    assert not rep.selected[:4].any()
    assert float((g - H.mean(0)).norm()) < 0.2
    g2, _ = agg(U, torch.ones(20), simple_round_context(U, seed=1))
    assert torch.equal(g, g2)
    assert set(rep.reasons) >= {0, 1, 2, 3} and rep.reasons[0] == "outlier"


def test_dnc_permutation_invariant_and_ignores_zero_weights():
    U = torch.randn(10, 40, generator=torch.Generator().manual_seed(8))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(9))
    agg = DEFENSES.build("dnc", f=2, b=20)
    g1, _ = agg(U, torch.ones(10), simple_round_context(U, seed=3))
    g2, _ = agg(U[perm], torch.ones(10), simple_round_context(U, seed=3))
    assert torch.allclose(g1, g2, atol=1e-6)
    w = torch.ones(10)
    w[3] = 0
    V = U.clone()
    V[3] = 1e9
    g3, rep = agg(V, w, simple_round_context(U, seed=3))
    g4, _ = agg(U[w > 0], torch.ones(9), simple_round_context(U, seed=3))
    assert torch.allclose(g3, g4) and not rep.selected[3]


def test_dnc_bounds_and_hyperparameters():
    U = torch.randn(3, 5)
    with pytest.raises(BoundError, match=r"dnc: needs n > 2f clients, got n=3, f=2"):
        DEFENSES.build("dnc", f=2, c=1.5)(U, torch.ones(3), simple_round_context(U))
    for params, param in [({"f": -1}, "f"), ({"c": 0}, "c"), ({"b": 0}, "b"), ({"iterations": 0}, "iterations")]:
        with pytest.raises(PhalanxError, match=f"dnc: {param}"):
            DEFENSES.build("dnc", **params)
    assert math.isfinite(DEFENSES.build("dnc", f=1)(U, torch.ones(3), simple_round_context(U))[0].sum())


# ------------------------------------------------------------------ bounds, just inside and just outside

@pytest.mark.parametrize("name,params,least,rule", [
    ("nnm", {"f": 2}, 5, "n > 2f"),
    ("dnc", {"f": 2}, 5, "n > 2f"),  # c = 1: the honest majority binds
    ("dnc", {"f": 2, "c": 3.0}, 7, "n > c*f"),  # 3f rows removed per iteration: ceil(c f) binds
    ("bucketing", {"s": 2, "aggregator": "median", "f": 2}, 9, "n > 2sf (s=2)"),
    ("bucketing", {"s": 3, "aggregator": "mean", "f": 1}, 7, "n > 2sf (s=3)"),
])
def test_each_rule_accepts_its_bound_and_refuses_one_row_less(name, params, least, rule):
    U = torch.randn(least, 4, generator=torch.Generator().manual_seed(least))
    stage = DEFENSES.build(name, **params)
    label = stage.name
    out = stage(U, torch.ones(least), simple_round_context(U))  # just inside
    assert bool(torch.isfinite(out[0]).all())
    with pytest.raises(BoundError) as e:  # just outside
        stage(U[:-1], torch.ones(least - 1), simple_round_context(U[:-1]))
    assert str(e.value) == f"{label}: needs {rule} clients, got n={least - 1}, f={params['f']}"


def test_bucketing_takes_f_from_a_pipeline_and_passes_it_to_the_inner_rule():
    from phalanx.defenses.pipeline import build_defense

    pipe = build_defense([{"bucketing": {"s": 2, "aggregator": "median"}}], f=3)
    agg = pipe.aggregator
    assert agg.f == 3 and agg.inner.f == 3
    U = torch.randn(13, 4)  # 13 > 2sf = 12, and the inner median gets ceil(13 / 2) = 7 > 2f buckets
    g, _ = agg(U, torch.ones(13), simple_round_context(U))
    assert g.shape == (4,)
    with pytest.raises(BoundError, match=r"bucketing\(median\): needs n > 2sf \(s=2\) clients, got n=12, f=3"):
        agg(U[:12], torch.ones(12), simple_round_context(U[:12]))


# ------------------------------------------------------------------ NNM's fast path against float64

def nnm_reference(U, f):
    A = U.double()
    n = U.shape[0]
    D = ((A[:, None, :] - A[None, :, :]) ** 2).sum(-1)
    D.fill_diagonal_(-1.0)
    near = torch.sort(D, dim=1, stable=True).indices[:, : n - f]
    return torch.stack([U[near[i]].double().mean(0) for i in range(n)]).float(), near


@pytest.mark.parametrize("seed", range(3))
def test_nnm_float32_path_matches_float64_neighbour_sets(seed):
    g = torch.Generator().manual_seed(40 + seed)
    base = torch.randn(20000, generator=g)
    U = base + torch.randn(30, 20000, generator=g)
    U[:6] = -3 * base  # bit-for-bit copies: their neighbour sets are cut inside the honest rows
    U[6] = U[10] + 2e-4 * torch.randn(20000, generator=g) / 141  # a near tie with row 10
    # f = 8 > 6 attack rows: the honest rows' cut falls inside the honest rows too
    V, _, rep = DEFENSES.build("nnm", f=8)(U, torch.ones(30), simple_round_context(U))
    ref, _ = nnm_reference(U, 8)
    assert torch.allclose(V, ref, atol=1e-5)


def test_nnm_near_tie_at_the_cut_is_settled_as_float64_settles_it():
    g = torch.Generator().manual_seed(7)
    U = 1 + torch.randn(24, 30000, generator=g)
    f = 8
    _, near = nnm_reference(U, f)
    j, l = int(near[0, -1]), int(torch.sort(((U.double() - U[0].double()) ** 2).sum(1)).indices[24 - f])
    U[l] = 2 * U[0] - U[j]  # the mirror image of row j through row 0: equally far, up to rounding
    ref, near = nnm_reference(U, f)
    D0 = ((U.double() - U[0].double()) ** 2).sum(1)
    assert abs(float(D0[l] - D0[j])) / float(D0[j]) < 1e-6  # float32 distances cannot order them
    V, _, rep = DEFENSES.build("nnm", f=f)(U, torch.ones(24), simple_round_context(U))
    assert torch.allclose(V, ref, atol=1e-5)


def test_nnm_keeps_inactive_rows_on_the_fast_path():
    g = torch.Generator().manual_seed(3)
    U = 2 + torch.randn(30, 20000, generator=g)
    w = torch.ones(30)
    w[[4, 11]] = 0
    U[4, 0] = float("nan")  # a rejected row may hold anything; it is passed through untouched
    V, _, _ = DEFENSES.build("nnm", f=5)(U, w, simple_round_context(U))
    keep = w > 0
    ref, _ = nnm_reference(U[keep], 5)
    assert torch.allclose(V[keep], ref, atol=1e-5)
    assert torch.equal(V[11], U[11]) and torch.isnan(V[4, 0]) and torch.equal(V[4, 1:], U[4, 1:])


def test_bucketing_means_match_index_add():
    g = torch.Generator().manual_seed(4)
    U = torch.randn(11, 5000, generator=g)
    w = torch.ones(11)
    w[2] = 0
    agg = DEFENSES.build("bucketing", s=3, aggregator="mean")
    out, rep = agg(U, w, simple_round_context(U, seed=1))
    buckets = rep.info["buckets"]
    assert sorted(sum(buckets, [])) == [i for i in range(11) if i != 2]
    ref = torch.stack([U[b].double().mean(0) for b in buckets]).mean(0)
    assert torch.allclose(out.double(), ref, atol=1e-6)


def test_nnm_float32_and_float64_paths_agree(monkeypatch):
    from phalanx.defenses import preagg

    g = torch.Generator().manual_seed(9)
    base = torch.randn(20000, generator=g)
    U = base + torch.randn(30, 20000, generator=g)
    U[:4] = -3 * base
    w = torch.ones(30)
    w[[2, 11]] = 0  # f = 6 > 2 active attackers: the cut falls inside the honest rows
    outs = []
    for tight in (False, True):
        monkeypatch.setattr(preagg, "cut_is_tight", lambda U, rows, k, tight=tight: tight)
        outs.append(DEFENSES.build("nnm", f=6)(U, w, simple_round_context(U))[0])
    assert torch.equal(outs[0], outs[1])
    ref, _ = nnm_reference(U[w > 0], 6)
    assert torch.allclose(outs[0][w > 0], ref, atol=1e-5)
