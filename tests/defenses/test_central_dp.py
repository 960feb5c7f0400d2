"""Central DP (DP-FedAvg): noise calibrated to the weighted mean's sensitivity, refusals, accounting, resume."""

import copy
import io
import math

import numpy as np
import pytest
import torch

from phalanx.context import simple_round_context
from phalanx.defenses.base import Layer, Report
from phalanx.defenses.clip import Clip
from phalanx.defenses.pipeline import Pipeline, build_defense
from phalanx.defenses.privacy import CentralDP, UpdateClip, clip_update, dp_epsilon
from phalanx.errors import PhalanxError
from phalanx.registry import DEFENSES


class RejectRow(Layer):
    """Gives one row weight 0 and leaves the rows as they are."""

    name = "reject_row"

    def __init__(self, row):
        self.row = row

    def __call__(self, U, w, ctx):
        w = w.clone()
        w[self.row] = 0
        rep = Report(self.name, U.shape[0])
        rep.reject(self.row, "test")
        return U, w, rep


class Scale(Layer):
    """Multiplies every row by a factor: a layer that breaks any norm bound set before it."""

    name = "scale"

    def __call__(self, U, w, ctx):
        return U * 3.0, w, Report(self.name, U.shape[0])


def mean():
    return DEFENSES.build("mean")


def rows(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def weighted_mean(U, w):
    p = w.double() / w.double().sum()
    return (p[:, None] * U.double()).sum(0)


# ---------------------------------------------------------------- the noise follows the sensitivity


def test_noise_is_calibrated_to_two_c_times_the_largest_accepted_share():
    # sample weighting on a non-iid split: the shares are far from 1/n, and the heaviest row is
    # rejected by a layer, so only the accepted rows may count
    counts = torch.tensor([40., 300., 75., 120., 60., 90., 200., 15.])
    n, d, z, C, seed = 8, 4000, 1.5, 0.5, 4
    U = rows(n, d, 0)
    post = CentralDP(z, sample_rate=0.25)
    pipe = Pipeline([UpdateClip(C), RejectRow(1)], mean(), [post])
    g, rep = pipe(U, counts, simple_round_context(U, seed=seed))
    acc = counts.clone()
    acc[1] = 0
    sens = 2 * C * 200 / 600  # accepted weights sum to 600, the largest is 200
    clean = weighted_mean(clip_update(U, C), acc)
    expected = z * sens * torch.randn(d, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(g.double() - clean, expected.double(), atol=1e-5)
    info = rep.info["reports"][-1].info
    assert info["sensitivity"] == pytest.approx(sens, rel=1e-12)
    assert info["sigma"] == pytest.approx(z * sens, rel=1e-12)
    assert info["sigma"] / info["sensitivity"] == pytest.approx(z, rel=1e-12)
    assert info["norm_bound"] == C and info["sample_rate"] == 0.25
    assert rep.selected.tolist() == [i != 1 for i in range(n)]


def test_clip_layer_bounds_with_its_current_bound_and_prune_keeps_it():
    n, d, z = 6, 3000, 1.0
    U = 5 * rows(n, d, 1)
    w = torch.tensor([1., 2., 3., 1., 1., 2.])
    clip = Clip("quantile", initial=0.7)
    post = CentralDP(z, sample_rate=0.5)
    g, rep = Pipeline([clip, DEFENSES.build("prune", ratio=0.5)], mean(), [post])(
        U, w, simple_round_context(U, seed=2))
    info = rep.info["reports"][-1].info
    assert info["norm_bound"] == pytest.approx(0.7)  # this round's bound (it then adapts)
    assert clip.bound != pytest.approx(0.7)
    assert info["sensitivity"] == pytest.approx(2 * 0.7 * 3 / 10, rel=1e-12)


def test_sensitivity_formula_is_an_upper_bound_and_is_attained():
    """||g - g_without_k|| <= 2 C p_k for every accepted row k (p_k its share with k present),
    with equality when u_k = -g_without_k at norm C; C * p_k alone would be too small."""
    agg = mean()
    C = 1.0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 9, (1,), generator=gen))
        U = clip_update(3 * torch.randn(n, 5, generator=gen, dtype=torch.float64), C)
        w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
        ctx = simple_round_context(U)
        g, _ = agg(U, w, ctx)
        for k in range(n):
            w_k = w.clone()
            w_k[k] = 0
            g_k, _ = agg(U, w_k, ctx)
            p_k = float(w[k] / w.sum())
            assert float((g - g_k).norm()) <= 2 * C * p_k * (1 + 1e-9)
    e = torch.tensor([1.0, 0.0], dtype=torch.float64)
    U = torch.stack([C * e, -C * e, -C * e])  # row 0 opposes the mean of the others, all at norm C
    w = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    g, _ = agg(U, w, simple_round_context(U))
    g_0, _ = agg(U, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), simple_round_context(U))
    assert float((g - g_0).norm()) == pytest.approx(2 * C * 0.5)
    assert CentralDP(1.0).sensitivity(w, C) == pytest.approx(2 * C * 0.5)
    assert float((g - g_0).norm()) > C * 0.5  # the brief's C * max p underestimates it


# ---------------------------------------------------------------- refusals


def test_refuses_when_no_layer_bounds_the_norms():
    with pytest.raises(PhalanxError, match="central_dp: needs a layer bounding each update's norm "
                                           r"before the aggregator \(update_clip or clip\), got no layers"):
        Pipeline([], mean(), [CentralDP(1.0)])
    with pytest.raises(PhalanxError, match="central_dp: needs a layer bounding .* got validate"):
        build_defense(["validate", "mean", {"central_dp": {"noise_multiplier": 1.0, "clip": 1.0}}])


@pytest.mark.parametrize("agg", ["median", "krum", "trimmed_mean", "geomed"])
def test_refuses_an_aggregator_that_is_not_a_weighted_mean(agg):
    with pytest.raises(PhalanxError, match=f"central_dp: needs a \\(weighted\\) mean aggregator.*got '{agg}'"):
        build_defense([{"update_clip": {"max_norm": 1.0}}, agg, {"central_dp": {"noise_multiplier": 1.0}}])


def test_refuses_bounds_one_client_can_move_or_that_do_not_reach_the_aggregator():
    with pytest.raises(PhalanxError, match="central_dp: .*max_norm='auto'"):
        build_defense([{"clip": {"max_norm": "auto"}}, "mean", {"central_dp": {"noise_multiplier": 1.0}}])
    with pytest.raises(PhalanxError, match="central_dp: needs the clipped rows .* got grad_noise after update_clip"):
        build_defense([{"update_clip": {"max_norm": 1.0}}, {"grad_noise": {"sigma": 0.1}}, "mean",
                       {"central_dp": {"noise_multiplier": 1.0}}])
    with pytest.raises(PhalanxError, match=r"central_dp: clip=0.5 but update_clip bounds norms by 1.0; expected a bound <= clip"):
        build_defense([{"update_clip": {"max_norm": 1.0}}, "mean", {"central_dp": {"noise_multiplier": 1.0, "clip": 0.5}}])
    # a layer that changes the clipped rows is caught at the first round
    U = rows(4, 10, 0)
    pipe = Pipeline([UpdateClip(1.0), Scale()], mean(), [CentralDP(1.0)])
    with pytest.raises(PhalanxError, match=r"central_dp: needs a norm bound .* \(scale changed the rows after update_clip\)"):
        pipe(U, torch.ones(4), simple_round_context(U))
    assert pipe.post[0].rounds == 0
    # the clip layer saw row 0 rejected and left it unclipped: a later layer reviving it loses the bound
    class Revive(Layer):
        name = "revive"

        def __call__(self, U, w, ctx):
            return U, torch.ones_like(w), Report(self.name, U.shape[0])

    pipe = Pipeline([RejectRow(0), Clip(1.0), Revive()], mean(), [CentralDP(1.0)])
    with pytest.raises(PhalanxError, match=r"revive changed the rows after clip"):
        pipe(10 * U, torch.ones(4), simple_round_context(U))
    with pytest.raises(PhalanxError, match="central_dp: needs the weights and norm bound a Pipeline records"):
        CentralDP(1.0)(torch.zeros(3), simple_round_context(U))


def test_a_fine_pipeline_leaves_the_callers_context_alone():
    U = rows(5, 20, 0)
    ctx = simple_round_context(U, seed=1)
    w = torch.ones(5)
    U0, w0 = U.clone(), w.clone()
    build_defense([{"update_clip": {"max_norm": 1.0}}, "validate", "mean", {"central_dp": {"noise_multiplier": 1.0}}])(U, w, ctx)
    assert ctx.extras == {} and torch.equal(U, U0) and torch.equal(w, w0)


# ---------------------------------------------------------------- accounting


def _opacus_rdp_epsilon(z, q, steps, delta):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def test_epsilon_is_the_accountant_at_z_while_sigma_follows_the_weights():
    z, q, delta, C, n, T = 1.1, 0.2, 1e-5, 2.0, 7, 9
    post = CentralDP(z, sample_rate=q, delta=delta)
    pipe = Pipeline([UpdateClip(C)], mean(), [post])
    sens = []
    for t in range(T):
        U = rows(n, 50, t)
        w = torch.rand(n, generator=torch.Generator().manual_seed(100 + t)) * 100 + 1
        _, rep = pipe(U, w, simple_round_context(U, seed=t))
        info = rep.info["reports"][-1].info
        assert info["sensitivity"] == pytest.approx(2 * C * float((w / w.sum()).max()), rel=1e-6)
        assert info["sigma"] == pytest.approx(z * info["sensitivity"], rel=1e-12)
        sens.append(info["sensitivity"])
    assert len(set(sens)) == T  # the weights, and so sigma, change every round
    assert post.rounds == T
    assert post.epsilon == pytest.approx(_opacus_rdp_epsilon(z, q, T, delta), rel=1e-12)
    assert post.epsilon == pytest.approx(dp_epsilon(z, q, T, delta), rel=1e-12)


def test_epsilon_without_sampling_matches_the_gaussian_mechanism_by_hand():
    # q = 1: RDP of T Gaussian mechanisms at noise multiplier z is T * a / (2 z^2); converted to
    # (eps, delta) with Balle et al. 2020's bound over Opacus' orders
    z, delta, T = 3.0, 1e-6, 12
    post = CentralDP(z, delta=delta)  # sample_rate left out: every client every round
    pipe = Pipeline([UpdateClip(1.0)], mean(), [post])
    for t in range(T):
        U = rows(4, 10, t)
        pipe(U, torch.ones(4), simple_round_context(U, seed=t))
    a = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=np.float64)
    eps = T * a / (2 * z * z) - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    assert post.epsilon == pytest.approx(float(eps.min()), rel=1e-9)


# ---------------------------------------------------------------- resume


def _roundtrip(state):
    buf = io.BytesIO()  # as a checkpoint stores it
    torch.save(copy.deepcopy(state), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _dp_pipeline():
    return build_defense([{"clip": {"max_norm": "quantile", "initial": 0.5}}, "mean",
                          {"central_dp": {"noise_multiplier": 1.0, "sample_rate": 0.3}}])


def test_resume_gives_the_same_epsilon_clip_bound_and_aggregates():
    rounds = [(rows(6, 30, t), torch.rand(6, generator=torch.Generator().manual_seed(50 + t)) + 0.5)
              for t in range(6)]

    def run(pipe, todo):
        return [pipe(U, w, simple_round_context(U, seed=100 + t))[0] for t, (U, w) in todo]

    whole = _dp_pipeline()
    ref = run(whole, enumerate(rounds))
    first = _dp_pipeline()
    run(first, list(enumerate(rounds))[:3])
    resumed = _dp_pipeline()
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    got = run(resumed, list(enumerate(rounds))[3:])
    assert all(torch.equal(a, b) for a, b in zip(ref[3:], got))
    assert resumed.post[0].epsilon == whole.post[0].epsilon == pytest.approx(dp_epsilon(1.0, 0.3, 6, 1e-5))
    assert resumed.post[0].rounds == 6
    assert resumed.layers[0].bound == whole.layers[0].bound
    fresh = _dp_pipeline()  # without the state, the run would differ: the state matters
    assert not torch.equal(run(fresh, list(enumerate(rounds))[3:])[-1], ref[-1])
    assert fresh.post[0].epsilon < whole.post[0].epsilon


def test_bad_state_is_a_clear_error():
    with pytest.raises(PhalanxError, match=r"clip: state 'bound' must be a finite number > 0, got -1"):
        Clip("quantile").load_state_dict({"bound": -1})
    with pytest.raises(PhalanxError, match=r"clip: state must have the key 'bound' only, got \['bogus'\]"):
        Clip("quantile").load_state_dict({"bogus": 1.0})
    with pytest.raises(PhalanxError, match=r"central_dp: state 'history' must be a list of \[noise_multiplier, "
                                           r"sample_rate, steps\] entries, got \[\[1.0, 2.0\]\]"):
        CentralDP(1.0).load_state_dict({"history": [[1.0, 2.0]]})
    with pytest.raises(PhalanxError, match="central_dp: state 'history'"):
        CentralDP(1.0).load_state_dict({"history": [[1.0, 0.5, 2.5]]})
    post = CentralDP(1.0, sample_rate=0.5)
    post.load_state_dict({"history": [[1.0, 0.5, 4]]})
    assert post.rounds == 4 and post.epsilon == pytest.approx(dp_epsilon(1.0, 0.5, 4, 1e-5))
