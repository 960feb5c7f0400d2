"""Validation, clipping and reputation layers."""

import numpy as np
import pytest
import torch

from phalanx.context import simple_round_context
from phalanx.defenses.base import Aggregator, Report
from phalanx.defenses.clip import Clip
from phalanx.defenses.pipeline import Pipeline
from phalanx.defenses.reputation import Reputation
from phalanx.defenses.validate import INGEST_KEY, Validate, collect_updates
from phalanx.errors import PhalanxError


class Mean(Aggregator):
    name = "test_mean"

    def __call__(self, U, w, ctx):
        return (U * w[:, None]).sum(0) / w.sum(), Report(self.name, U.shape[0])


def honest(n=8, d=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.ones(d) + 0.3 * torch.randn(n, d, generator=g)


# ---------------------------------------------------------------- validation
def test_validate_rejects_each_bad_row_with_its_reason():
    U = honest(10)
    U[2, 3] = float("nan")
    U[5, 0] = float("inf")
    U[7] *= 100.0
    ctx = simple_round_context(U)
    U2, w2, rep = Validate()(U, torch.ones(10), ctx)
    assert rep.reasons == {2: "nonfinite", 5: "nonfinite", 7: "norm_outlier"}
    assert torch.equal(w2 == 0, torch.tensor([i in (2, 5, 7) for i in range(10)]))
    assert torch.isfinite(U2).all()
    keep = [i for i in range(10) if i not in (2, 5, 7)]
    assert torch.equal(U2[keep], U[keep])


def test_collect_updates_reasons_reach_the_report():
    d = 6
    raw = [torch.ones(d), torch.ones(d + 1), torch.ones(d, dtype=torch.int64), "junk", np.ones(d, np.float64)]
    U, reasons = collect_updates(raw, d)
    assert reasons == {1: "wrong_size", 2: "bad_dtype", 3: "not_a_tensor"}
    assert U.shape == (5, d) and U.dtype == torch.float32 and torch.equal(U[4], torch.ones(d))
    ctx = simple_round_context(U)
    ctx.extras[INGEST_KEY] = reasons
    _, w, rep = Validate()(U, torch.ones(5), ctx)
    assert rep.reasons == reasons and w.tolist() == [1, 0, 0, 0, 1]


def test_validate_never_raises_on_all_bad_rows_but_refuses_a_wrong_model():
    U = torch.full((4, 5), float("nan"))
    _, w, rep = Validate()(U, torch.ones(4), simple_round_context(U))
    assert w.sum() == 0 and set(rep.reasons.values()) == {"nonfinite"}
    with pytest.raises(PhalanxError, match="5 columns, the model has 3"):
        Validate()(U, torch.ones(4), simple_round_context(U, global_params=torch.zeros(3)))


def test_pipeline_skips_a_round_when_everyone_is_rejected():
    U = torch.full((4, 5), float("nan"))
    g, rep = Pipeline([Validate()], Mean())(U, torch.ones(4), simple_round_context(U))
    assert torch.equal(g, torch.zeros(5)) and rep.info["skipped"]
    # later layers are not asked to judge zero rows (nnm would refuse them)
    from phalanx.defenses.preagg import NNM

    g, rep = Pipeline([Validate(), NNM(f=1), Clip(max_norm=1.0)], Mean())(U, torch.ones(4), simple_round_context(U))
    assert rep.info["skipped"] and rep.info["stages"] == ["validate"]


# ---------------------------------------------------------------- clipping
def test_fixed_clip_bounds_norms_and_leaves_small_rows():
    U = honest(6) * torch.tensor([0.01, 1, 2, 3, 4, 5])[:, None]
    U2, _, rep = Clip(max_norm=3.0)(U, torch.ones(6), simple_round_context(U))
    norms = U2.norm(dim=1)
    assert (norms <= 3.0 + 1e-4).all()
    assert torch.equal(U2[0], U[0])
    assert torch.allclose(U2[5] / U2[5].norm(), U[5] / U[5].norm())  # direction kept


def test_auto_clip_uses_median_norm():
    U = honest(5) * torch.tensor([1.0, 2, 3, 4, 50])[:, None]
    med = float(U.norm(dim=1).median())
    U2, _, rep = Clip("auto")(U, torch.ones(5), simple_round_context(U))
    assert rep.info["bound"] == pytest.approx(med, rel=1e-6)
    assert float(U2.norm(dim=1).max()) == pytest.approx(med, rel=1e-4)


def test_quantile_clip_tracks_the_quantile_across_rounds():
    clip = Clip("quantile", quantile=0.5, eta=0.3, initial=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        U = torch.randn(50, 20, generator=g)  # norms concentrate near sqrt(20) = 4.47
        clip(U, torch.ones(50), simple_round_context(U))
    assert 3.8 < clip.bound < 5.2
    other = Clip("quantile")
    other.load_state_dict(clip.state_dict())
    assert other.bound == clip.bound


def test_clip_bad_parameters():
    with pytest.raises(PhalanxError, match="max_norm must be"):
        Clip("median")
    with pytest.raises(PhalanxError, match="max_norm must be a number > 0"):
        Clip(-1.0)
    with pytest.raises(PhalanxError, match="quantile must be in"):
        Clip("quantile", quantile=1.5)


# ---------------------------------------------------------------- reputation
def simulate(rounds, attacker_until, n=10, seed=0):
    """Client 0 sign-flips for rounds < attacker_until; returns per-round quarantine status of client 0."""
    rep = Reputation(use_validation=False)
    pipe = Pipeline([rep], Mean())
    status = []
    for r in range(rounds):
        U = honest(n, seed=seed + r)
        if r < attacker_until:
            U[0] = -U[0]
        ctx = simple_round_context(U, round=r)
        _, report = pipe(U, torch.ones(n), ctx)
        status.append("c0" in rep.quarantined)
    return rep, status


def test_reputation_quarantines_a_persistent_sign_flipper():
    rep, status = simulate(10, attacker_until=10)
    first = status.index(True)
    assert first <= 3 and all(status[first:])
    assert all(rep.score(f"c{i}") > 0.8 for i in range(1, 10))
    assert not any(f"c{i}" in rep.quarantined for i in range(1, 10))


def test_reputation_lets_a_reformed_client_back():
    rep, status = simulate(20, attacker_until=6)
    assert status[5] is True
    back = next(i for i in range(6, 20) if not status[i])
    assert back - 6 <= 5 and not any(status[back:])
    assert rep.history["c0"][-1] > 0.5


def test_reputation_state_round_trip_and_unknown_prior():
    rep, _ = simulate(5, attacker_until=5)
    other = Reputation()
    other.load_state_dict(rep.state_dict())
    assert other.quarantined == rep.quarantined and other.scores == rep.scores
    assert other.score("never-seen") == other.prior
    with pytest.raises(PhalanxError, match="release must be >= threshold"):
        Reputation(threshold=0.5, release=0.4)


def test_reputation_can_quarantine_without_reweighting():
    from phalanx.registry import DEFENSES

    U = honest(4)
    rep = DEFENSES.build("reputation", weight_by_reputation=False)
    rep.scores = {"c0": 0.9, "c1": 0.4}
    rep.quarantined = {"c2"}
    _, w, report = rep(U, torch.full((4,), 2.0), simple_round_context(U))
    assert w.tolist() == [2.0, 2.0, 0.0, 2.0] and report.reasons == {2: "quarantined"}
    weighted = DEFENSES.build("reputation")
    weighted.scores = dict(rep.scores)
    _, w2, _ = weighted(U, torch.full((4,), 2.0), simple_round_context(U))
    assert w2[0] == pytest.approx(1.8) and w2[1] == pytest.approx(0.8)


def test_reputation_quarantines_at_most_f_clients_the_lowest_scored():
    U = honest(10)
    rep = Reputation(use_validation=False, f=2)
    pipe = Pipeline([rep], Mean())
    for r in range(6):
        U = honest(10, seed=r)
        U[:4] = -U[:4]  # four sign-flippers, but the server assumes at most two
        U[0] *= 3.0  # rows 0 and 1 are the farthest from the aggregate
        U[1] = -U[1].abs() * 2
        pipe(U, torch.ones(10), simple_round_context(U, round=r))
    assert len(rep.quarantined) == 2
    lowest = sorted(rep.scores, key=rep.scores.get)[:2]
    assert rep.quarantined == set(lowest)
    unbounded = Reputation(use_validation=False)
    pipe = Pipeline([unbounded], Mean())
    for r in range(6):
        U = honest(10, seed=r)
        U[:4] = -U[:4]
        pipe(U, torch.ones(10), simple_round_context(U, round=r))
    assert len(unbounded.quarantined) == 4
    with pytest.raises(PhalanxError, match="reputation: f must be"):
        Reputation(f=-1)


def test_reputation_leaves_room_for_rows_earlier_layers_dropped():
    U = honest(10)
    rep = Reputation(use_validation=False, f=3)
    rep.scores = {"c0": 0.0, "c1": 0.05, "c2": 0.1}
    rep.quarantined = {"c0", "c1", "c2"}
    w = torch.ones(10)
    w[5] = w[6] = 0.0  # two rows already dropped this round
    _, w2, report = rep(U, w, simple_round_context(U))
    assert report.reasons == {0: "quarantined"} and int((w2 == 0).sum()) == 3


def _reputation_round(pipe, r, n_clients=12, k=9):
    """Round r: k of n_clients sampled (partial participation); c0..c2 sign-flip, c3 scales up."""
    g = torch.Generator().manual_seed(100 + r)
    ids = sorted(torch.randperm(n_clients, generator=g)[:k].tolist())
    U = honest(k, seed=r)
    for row, c in enumerate(ids):
        if c < 3:
            U[row] = -U[row]
        elif c == 3:
            U[row] = U[row] * 8.0
    ctx = simple_round_context(U, round=r, val_loss=lambda p: float((p - 1.0).square().mean()))
    ctx.client_ids = [f"c{c}" for c in ids]
    w = torch.ones(k)
    w[0] = 0.0 if r % 3 == 0 else 1.0  # now and then an earlier layer dropped a row
    g_out, report = pipe(U, w, ctx)
    rep = report.info["reports"][0]
    return g_out, rep.scores.clone(), sorted(rep.reasons.items()), sorted(report.reasons.items())


def test_reputation_resumed_from_state_dict_continues_exactly_like_an_uninterrupted_run():
    import copy
    import json

    from phalanx.registry import DEFENSES

    params = {"decay": 0.6, "f": 3, "threshold": 0.35, "release": 0.55}
    straight = DEFENSES.build("reputation", **params)
    first = DEFENSES.build("reputation", **params)
    pipe_s, pipe_1 = Pipeline([straight], Mean()), Pipeline([first], Mean())
    for r in range(5):
        _reputation_round(pipe_s, r)
        _reputation_round(pipe_1, r)
    state = first.state_dict()
    saved = copy.deepcopy(state)
    assert set(state) >= {"scores", "quarantined", "history"} and state["quarantined"]
    resumed = DEFENSES.build("reputation", **params)  # a fresh process
    resumed.load_state_dict(json.loads(json.dumps(state)))  # checkpoints may go through JSON
    assert resumed.state_dict() == state
    pipe_r = Pipeline([resumed], Mean())
    for r in range(5, 12):
        a, b = _reputation_round(pipe_s, r), _reputation_round(pipe_r, r)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:], r
    assert resumed.state_dict() == straight.state_dict()
    assert first.state_dict() == saved  # saving handed out copies: the layer's state is its own


def test_reputation_load_state_dict_refuses_a_state_it_cannot_use():
    rep = Reputation()
    good = {"scores": {"c0": 0.2, "c1": 0.9}, "quarantined": ["c0"], "history": {"c0": [0.2], "c1": [0.9]}}
    rep.load_state_dict(good)
    assert rep.quarantined == {"c0"} and rep.score("c1") == 0.9
    for bad, what in [({"score": {}}, "keys"),
                      ({**good, "extra": 1}, "keys"),
                      ({**good, "scores": {"c0": "high"}}, "scores"),
                      ({**good, "scores": [0.2]}, "scores"),
                      ({**good, "quarantined": ["c9"]}, "quarantined"),
                      ({**good, "history": {"c0": 0.2}}, "history")]:
        with pytest.raises(PhalanxError, match=f"reputation: state {what}"):
            Reputation().load_state_dict(bad)
    Reputation().load_state_dict({})  # a fresh pipeline slot: nothing to restore
