"""Detection-style defenses: FLTrust, SignGuard, FoolsGold, FLAME."""

import math

import numpy as np
import pytest
import torch

import phalanx.defenses  # noqa: F401
from phalanx.context import simple_round_context
from phalanx.errors import PhalanxError
from phalanx.registry import DEFENSES


def honest_and_base(n=16, d=40, seed=0, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    return base + spread * torch.randn(n, d, generator=gen), base


def permuted_ctx(U, perm, **kw):
    ctx = simple_round_context(U[perm], **kw)
    ctx.client_ids = [f"c{i}" for i in perm.tolist()]
    return ctx


# ------------------------------------------------------------------ FLTrust

def test_fltrust_by_hand():
    U = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    ctx = simple_round_context(U, server_update=lambda: torch.tensor([1.0, 0.0]))
    g, rep = DEFENSES.build("fltrust")(U, torch.ones(4), ctx)
    r = 1 / math.sqrt(2)
    # rows rescaled to |g0| = 1: [1, 0] (trust 1) and [r, r] (trust r); the others have trust 0
    expect = (torch.tensor([1.0, 0.0]) + r * torch.tensor([r, r])) / (1 + r)
    assert torch.allclose(g, expect, atol=1e-6)
    assert torch.allclose(rep.scores, torch.tensor([1.0, 0.0, 0.0, r], dtype=torch.float64))
    assert rep.selected.tolist() == [True, False, False, True]
    assert rep.reasons == {1: "negative_cosine", 2: "negative_cosine"}


def test_fltrust_matches_loop_and_resists_attack():
    H, base = honest_and_base()
    U = torch.cat([-1e6 * base.expand(4, -1), H])
    ctx = simple_round_context(U, server_update=lambda: base)
    g, rep = DEFENSES.build("fltrust")(U, torch.ones(20), ctx)
    num, den = torch.zeros(40, dtype=torch.float64), 0.0
    for x in U.double():
        ts = max(0.0, float(x @ base.double() / (x.norm() * base.double().norm())))
        num += ts * x * base.double().norm() / x.norm()
        den += ts
    assert torch.allclose(g.double(), num / den, atol=1e-5)
    assert not rep.selected[:4].any()
    assert float((g - H.mean(0)).norm()) < 0.3 * float(base.norm())


def test_fltrust_gives_nan_rows_no_trust_and_aggregates_the_rest():
    U = torch.tensor([[2.0, 0.0], [math.nan, 1.0], [1.0, 1.0], [math.inf, 0.0]])
    ctx = simple_round_context(U, server_update=lambda: torch.tensor([1.0, 0.0]))
    g, rep = DEFENSES.build("fltrust")(U, torch.ones(4), ctx)
    clean = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    ctx = simple_round_context(clean, server_update=lambda: torch.tensor([1.0, 0.0]))
    expect, _ = DEFENSES.build("fltrust")(clean, torch.ones(2), ctx)
    assert torch.allclose(g, expect)
    assert rep.reasons == {1: "nonfinite", 3: "nonfinite"} and rep.selected.tolist() == [True, False, True, False]


def test_fltrust_needs_server_update():
    U = torch.randn(4, 3)
    with pytest.raises(PhalanxError, match="fltrust: needs ctx.server_update"):
        DEFENSES.build("fltrust")(U, torch.ones(4), simple_round_context(U))
    ctx = simple_round_context(U, server_update=lambda: torch.zeros(3))
    with pytest.raises(PhalanxError, match="non-zero"):
        DEFENSES.build("fltrust")(U, torch.ones(4), ctx)
    ctx = simple_round_context(U, server_update=lambda: torch.ones(5))
    with pytest.raises(PhalanxError, match="3 values"):
        DEFENSES.build("fltrust")(U, torch.ones(4), ctx)


def test_fltrust_all_untrusted_gives_zero_step():
    U = -torch.ones(3, 2)
    ctx = simple_round_context(U, server_update=lambda: torch.ones(2))
    g, rep = DEFENSES.build("fltrust")(U, torch.ones(3), ctx)
    assert torch.equal(g, torch.zeros(2)) and rep.info["all_untrusted"]


# ------------------------------------------------------------------ SignGuard

@pytest.mark.parametrize("clustering", ["meanshift", "kmeans"])
def test_signguard_filters_norm_and_sign_attackers(clustering):
    # sign statistics only tell rows apart when the honest signs are skewed: base mostly positive
    H, base = honest_and_base(n=16, d=400)
    H = H - base + base.abs()
    base = base.abs()
    U = torch.cat([1e6 * torch.ones(2, 400), -H[:3], H])  # 2 huge rows, 3 sign-flipped rows
    agg = DEFENSES.build("signguard", clustering=clustering, coords=0.5)
    g, rep = agg(U, torch.ones(21), simple_round_context(U))
    assert rep.reasons[0] == rep.reasons[1] == "norm_outlier"
    assert all(rep.reasons[i] == "sign_cluster" for i in (2, 3, 4))
    assert rep.selected[5:].sum() >= 14
    assert float((g - H.mean(0)).norm()) < 0.15 * float(base.norm())
    g2, _ = agg(U, torch.ones(21), simple_round_context(U))
    assert torch.equal(g, g2)


def test_signguard_clips_to_median_norm_by_reference():
    H, _ = honest_and_base(n=9, d=30, spread=1.0)
    g, rep = DEFENSES.build("signguard", lower=1e-3, upper=1e3)(H, torch.ones(9), simple_round_context(H))
    keep = rep.selected
    norms = H.double().norm(dim=1)
    med = float(np.median(norms.numpy()))
    ref = sum(H[i].double() * min(1.0, med / float(norms[i])) for i in range(9) if keep[i]) / int(keep.sum())
    assert torch.allclose(g.double(), ref, atol=1e-5)
    assert torch.allclose(rep.scores, norms / med)


def test_signguard_hyperparameters():
    for params, param in [({"lower": 0}, "lower"), ({"upper": 0.05}, "upper"),
                          ({"coords": 0}, "coords"), ({"clustering": "dbscan"}, "clustering"),
                          ({"f": -1}, "f")]:
        with pytest.raises(PhalanxError, match=f"signguard: {param}"):
            DEFENSES.build("signguard", **params)


# ------------------------------------------------------------------ FoolsGold

def ref_foolsgold(histories, updates, kappa=1.0):
    """The published algorithm, written with loops."""
    n = len(histories)
    H = np.stack(histories)
    Hn = H / np.maximum(np.linalg.norm(H, axis=1, keepdims=True), 1e-12)
    cs = Hn @ Hn.T - np.eye(n)
    maxcs = cs.max(1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = np.clip(1 - cs.max(1), 0, 1)
    wv = wv / wv.max()
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = kappa * np.log(wv / (1 - wv)) + 0.5
    wv[(np.isinf(wv) + wv) > 1] = 1  # as published: +inf -> 1, -inf -> 0 below
    wv[wv < 0] = 0
    return (wv @ np.stack(updates)) / wv.sum(), wv


def test_foolsgold_matches_reference_over_rounds():
    gen = torch.Generator().manual_seed(1)
    agg = DEFENSES.build("foolsgold")
    hist = [np.zeros(12) for _ in range(8)]
    for rnd in range(3):
        U = torch.randn(8, 12, generator=gen)
        U[6] = U[7] = torch.ones(12) + 0.01 * rnd  # two sybils
        for i in range(8):
            hist[i] = hist[i] + U[i].double().numpy()
        g, rep = agg(U, torch.ones(8), simple_round_context(U, round=rnd))
        ref, wv = ref_foolsgold(hist, [u.double().numpy() for u in U])
        assert np.allclose(rep.scores.numpy(), wv, atol=1e-9)
        assert np.allclose(g.double().numpy(), ref, atol=1e-5)
    assert rep.scores[6] == 0 and rep.scores[7] == 0
    assert rep.reasons[6] == "sybil"


def test_foolsgold_is_keyed_by_client_id_and_round_trips():
    gen = torch.Generator().manual_seed(2)
    rounds = [torch.randn(6, 10, generator=gen) for _ in range(2)]
    a, b = DEFENSES.build("foolsgold"), DEFENSES.build("foolsgold")
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    for U in rounds:
        ga, _ = a(U, torch.ones(6), simple_round_context(U))
        gb, _ = b(U[perm], torch.ones(6), permuted_ctx(U, perm))
        assert torch.allclose(ga, gb, atol=1e-6)
    state = a.state_dict()
    c = DEFENSES.build("foolsgold")
    c.load_state_dict(state)
    U = torch.randn(6, 10, generator=gen)
    assert torch.equal(a(U, torch.ones(6), simple_round_context(U))[0],
                       c(U, torch.ones(6), simple_round_context(U))[0])
    with pytest.raises(PhalanxError, match="foolsgold: state"):
        c.load_state_dict({"history": None})


def test_foolsgold_zero_weight_rows_leave_history_alone():
    U = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    agg = DEFENSES.build("foolsgold")
    _, rep = agg(U, w, simple_round_context(U))
    assert "c2" not in agg.state_dict()["ids"] and not rep.selected[2]


# ------------------------------------------------------------------ FLAME

def test_flame_drops_the_minority_cluster_and_clips():
    H, base = honest_and_base(n=16, d=60)
    gen = torch.Generator().manual_seed(5)
    attack = torch.randn(60, generator=gen) * 50  # a different direction, large norm
    U = torch.cat([attack + 0.01 * torch.randn(5, 60, generator=gen), H])
    g, rep = DEFENSES.build("flame", noise=0)(U, torch.ones(21), simple_round_context(U))
    assert not rep.selected[:5].any() and rep.selected[5:].sum() >= 21 // 2 + 1  # min_cluster_size
    assert rep.reasons[0] == "outside_cluster"
    keep = rep.selected
    S = float(np.median(U.double().norm(dim=1).numpy()))
    ref = sum(U[i].double() * min(1.0, S / float(U[i].double().norm())) for i in range(21) if keep[i])
    assert torch.allclose(g.double(), ref / int(keep.sum()), atol=1e-5)
    assert rep.info["clip_norm"] == pytest.approx(S)
    assert float((g - H.mean(0)).norm()) < 0.2 * float(base.norm())


def test_flame_noise_comes_from_the_generator():
    H, _ = honest_and_base(n=10, d=20000, spread=0.5)
    clean, rep = DEFENSES.build("flame", noise=0)(H, torch.ones(10), simple_round_context(H))
    agg = DEFENSES.build("flame", noise=0.01)
    g1, _ = agg(H, torch.ones(10), simple_round_context(H, seed=4))
    g2, _ = agg(H, torch.ones(10), simple_round_context(H, seed=4))
    g3, _ = agg(H, torch.ones(10), simple_round_context(H, seed=5))
    assert torch.equal(g1, g2) and not torch.equal(g1, g3)
    sigma = 0.01 * rep.info["clip_norm"]
    assert float((g1 - clean).std()) == pytest.approx(sigma, rel=0.05)


def test_flame_permutation_invariant_without_noise():
    H, _ = honest_and_base(n=12, d=30)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(6))
    agg = DEFENSES.build("flame", noise=0)
    g1, _ = agg(H, torch.ones(12), simple_round_context(H))
    g2, _ = agg(H[perm], torch.ones(12), permuted_ctx(H, perm))
    assert torch.allclose(g1, g2, atol=1e-6)
    with pytest.raises(PhalanxError, match="flame: noise"):
        DEFENSES.build("flame", noise=-1)


@pytest.mark.parametrize("name", ["fltrust", "signguard", "foolsgold", "flame"])
def test_zero_weight_rows_are_ignored(name):
    H, base = honest_and_base(n=10, d=50)
    w = torch.ones(10)
    w[[0, 5]] = 0
    V = H.clone()
    V[[0, 5]] = -1e6
    kw = {"server_update": lambda: base}
    params = {"noise": 0} if name == "flame" else {}
    g1, rep = DEFENSES.build(name, **params)(V, w, simple_round_context(V, **kw))
    g2, _ = DEFENSES.build(name, **params)(H[w > 0], torch.ones(8), simple_round_context(H[w > 0], **kw))
    assert torch.allclose(g1, g2, atol=1e-6)
    assert not rep.selected[[0, 5]].any() and rep.n == 10


def test_sign_filter_layer_drops_the_odd_sign_rows_and_keeps_the_matrix():
    H, base = honest_and_base(n=16, d=400)
    H = H - base + base.abs()
    U = torch.cat([-H[:3], H])  # 3 sign-flipped rows
    layer = DEFENSES.build("sign_filter", coords=0.5)
    U2, w, rep = layer(U, torch.ones(19), simple_round_context(U))
    assert torch.equal(U2, U)
    assert {i for i, why in rep.reasons.items() if why == "sign_cluster"} == {0, 1, 2}
    assert w[:3].eq(0).all() and w[3:].eq(1).all() and not rep.info["inconclusive"]
    # more odd rows than the f the server assumes: only the f farthest go
    capped = DEFENSES.build("sign_filter", coords=0.5, f=2)
    _, w, rep = capped(U, torch.ones(19), simple_round_context(U))
    assert len(rep.reasons) == 2 and set(rep.reasons) <= {0, 1, 2} and rep.info["capped"]
    assert int(w.eq(0).sum()) == 2
    with pytest.raises(PhalanxError, match="sign_filter: min_keep"):
        DEFENSES.build("sign_filter", min_keep=2)


# ------------------------------------------------------------------ bounds, just inside and just outside

@pytest.mark.parametrize("name,params", [("signguard", {}), ("flame", {"noise": 0}), ("sign_filter", {})])
@pytest.mark.parametrize("f,least", [(2, 5), (4, 9)])
def test_honest_majority_rules_accept_n_2f_plus_1_and_refuse_one_row_less(name, params, f, least):
    from phalanx.errors import BoundError

    H, base = honest_and_base(n=least, d=50)
    stage = DEFENSES.build(name, f=f, **params)
    out = stage(H, torch.ones(least), simple_round_context(H))  # just inside
    assert bool(torch.isfinite(out[0]).all())
    with pytest.raises(BoundError) as e:  # just outside: one row fewer, or one row rejected before
        stage(H[:-1], torch.ones(least - 1), simple_round_context(H[:-1]))
    assert str(e.value) == f"{name}: needs n > 2f clients, got n={least - 1}, f={f}"
    w = torch.ones(least)
    w[0] = 0.0
    with pytest.raises(BoundError, match=f"got n={least - 1}, f={f}"):
        stage(H, w, simple_round_context(H))


@pytest.mark.parametrize("name", ["fltrust", "foolsgold"])
def test_rules_without_a_bound_accept_a_byzantine_majority(name):
    # FLTrust trusts its root data set, FoolsGold bounds no sybil count: f does not limit n
    H, base = honest_and_base(n=4, d=20)
    g, _ = DEFENSES.build(name, f=3)(H, torch.ones(4), simple_round_context(H, server_update=lambda: base))
    assert bool(torch.isfinite(g).all())


# ------------------------------------------------------------------ our MeanShift against scikit-learn's

def _same_partition(a, b):
    n = len(a)
    return ((a < 0) == (b < 0)).all() and all((a[i] == a[j]) == (b[i] == b[j])
                                             for i in range(n) for j in range(n) if a[i] >= 0 and a[j] >= 0)


@pytest.mark.parametrize("kind", ["uniform", "two_groups", "rounded", "copies"])
def test_mean_shift_matches_scikit_learn(kind):
    import warnings

    from sklearn.cluster import MeanShift

    from phalanx.defenses.detect import estimate_bandwidth, mean_shift_labels

    rng = np.random.default_rng(["uniform", "two_groups", "rounded", "copies"].index(kind))
    for _ in range(25):
        n = int(rng.integers(4, 60))
        if kind == "uniform":
            X = rng.random((n, 3))
        elif kind == "two_groups":
            X = np.concatenate([rng.normal(0.5, 0.01, (n - n // 4, 3)), rng.normal(0.2, 0.01, (n // 4, 3))])
        elif kind == "rounded":  # many points share grid cells and distances
            X = np.round(rng.random((n, 3)), 1)
        else:
            X = rng.normal(0.5, 0.05, (n, 3))
            X[: n // 3] = X[0]
        bw = estimate_bandwidth(X)
        if not bw > 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = MeanShift(bandwidth=bw, bin_seeding=True, cluster_all=False).fit(X).labels_
        assert _same_partition(mean_shift_labels(X, bw), ref)


def test_sign_statistics_match_direct_counts():
    from phalanx.defenses.detect import sign_statistics

    g = torch.Generator().manual_seed(0)
    U = torch.randn(9, 50000, generator=g)
    U[:, ::7] = 0
    rows = torch.tensor([0, 2, 3, 8])
    feats, k = sign_statistics(U, 0.3, torch.Generator().manual_seed(5), rows)
    cols = torch.randperm(50000, generator=torch.Generator().manual_seed(5))[:k].sort().values
    sub = U[rows][:, cols]
    ref = torch.stack([(sub > 0).double().mean(1), (sub == 0).double().mean(1), (sub < 0).double().mean(1)], 1)
    assert k == 15000 and np.allclose(feats, ref.numpy(), atol=1e-12)
