"""Reputation under label skew: judged by direction against its peers and its own record, never
aborting a round, and not driven to quarantine by other layers' non-malformed rejections."""

import json

import pytest
import torch

from phalanx.context import simple_round_context
from phalanx.defenses.base import Aggregator, Layer, Report
from phalanx.defenses.pipeline import Pipeline
from phalanx.defenses.reputation import Reputation
from phalanx.defenses.validate import Validate
from phalanx.errors import PhalanxError
from phalanx.registry import DEFENSES

D = 200


class Mean(Aggregator):
    name = "test_mean"

    def __call__(self, U, w, ctx):
        return (U * w[:, None]).sum(0) / w.sum(), Report(self.name, U.shape[0])


class Reject(Layer):
    """Rejects the given rows every round with the given reason (a stand-in for sign_filter etc.)."""

    name = "test_reject"

    def __init__(self, rows, reason):
        self.rows, self.reason = rows, reason

    def __call__(self, U, w, ctx):
        rep = Report(self.name, U.shape[0])
        w = w.clone()
        for row in self.rows:
            w[row] = 0.0
            rep.reject(row, self.reason)
        return U, w, rep


def skewed_round(r, n=12, skewed=(8, 9, 10, 11), flipper=0):
    """Most rows near a common direction; the ``skewed`` rows mostly follow a direction of their own
    (their labels), so their cosine with the aggregate is persistently low (about 0.15-0.3 of the
    typical one) but positive; row ``flipper`` (if any) sends the negated update."""
    g = torch.Generator().manual_seed(1000 + r)
    common = torch.ones(D)
    U = common + 0.8 * torch.randn(n, D, generator=g)
    for i in skewed:
        own = torch.Generator().manual_seed(i)  # the same private direction every round
        U[i] = 0.12 * common + 1.5 * torch.randn(D, generator=own) + 0.5 * torch.randn(D, generator=g)
    if flipper is not None:
        U[flipper] = -U[flipper]
    return U


def run(rep, rounds, make=skewed_round, layers=(), agg=None, ctx_kw=None):
    pipe = Pipeline([*layers, rep], agg or Mean())
    status = []
    for r in range(rounds):
        U = make(r)
        ctx = simple_round_context(U, round=r, **(ctx_kw or {}))
        pipe(U, torch.ones(U.shape[0]), ctx)
        status.append(set(rep.quarantined))
    return status


def test_label_skewed_honest_clients_are_never_quarantined_but_a_sign_flipper_is():
    U = skewed_round(0, flipper=None)
    cos = torch.nn.functional.cosine_similarity(U, U.mean(0, keepdim=True))
    ratio = cos / cos.median()
    assert bool((ratio[8:] > 0.05).all() and (ratio[8:] < 0.4).all())  # persistently low, positive
    rep = Reputation(use_validation=False, f=3)
    status = run(rep, 15)
    first = next(r for r, q in enumerate(status) if "c0" in q)
    assert first <= 2 and all("c0" in q for q in status[first:])
    assert all(q <= {"c0"} for q in status)  # no honest client, skewed or not, is ever quarantined
    assert all(rep.score(f"c{i}") > 0.6 for i in range(8, 12))
    # the rule this replaces (agreement = cosine / median cosine, clamped to [0, 1]) would have
    # driven the skewed clients to ~ratio, under the threshold
    assert float(ratio[8:].max()) < rep.threshold + 0.1


def test_an_orthogonal_row_earns_half_credit_and_a_far_norm_outlier_none():
    rep = Reputation(use_validation=False)
    U = skewed_round(0, skewed=(), flipper=None)
    U[1] = U[1] - (U[1] @ U[2:].mean(0)) / U[2:].mean(0).square().sum() * U[2:].mean(0)  # orthogonal to the rest
    U[2] = U[2] * 50.0  # same direction, 50x the norm
    g = U[3:].mean(0)
    c = rep.contributions(U, g, simple_round_context(U), torch.ones(12, dtype=torch.bool))
    assert 0.35 < float(c[1]) < 0.65 and float(c[2]) < 1e-6 and bool((c[3:] == 1.0).all())


@pytest.mark.parametrize("reason", ["sign_cluster", "norm_outlier", "trimmed"])
def test_rows_another_layer_rejects_for_a_non_malformed_reason_are_not_quarantined(reason):
    rep = Reputation(use_validation=False, f=4)
    status = run(rep, 12, layers=[Reject([3, 4, 8], reason)])  # honest rows, one of them skewed
    assert all(q <= {"c0"} for q in status) and "c0" in status[-1]
    assert all(rep.score(f"c{i}") > 0.6 for i in (3, 4, 8))


def test_malformed_rows_earn_nothing():
    def nan_round(r):
        U = skewed_round(r, skewed=(), flipper=None)
        U[5, 3] = float("nan")
        return U

    rep = Reputation(use_validation=False, f=2)
    status = run(rep, 4, make=nan_round, layers=[Validate(check_norms=False)])
    assert "c5" in status[-1] and status[-1] == {"c5"}
    a, b, expected = 1.2, 0.8, []  # the prior's evidence (0.6 x 2 rounds), then a bad round each time
    for _ in range(4):
        a, b = 0.9 * a, 0.9 * b + 1.0
        expected.append(a / (a + b))
    assert rep.history["c5"] == pytest.approx(expected)
    # a failed signature (the pipeline may pass the reasons) counts as malformed, a sign cluster not
    other = Reputation(use_validation=False)
    U = skewed_round(0, skewed=(), flipper=None)
    ctx = simple_round_context(U)
    rejected = torch.zeros(12, dtype=torch.bool)
    rejected[[1, 2]] = True
    other.observe(U, torch.ones(12), U.mean(0), ctx, rejected,
                  reasons={1: "verify:bad_signature", 2: ["sign_filter:sign_cluster"]})
    assert other.score("c1") == pytest.approx(1.08 / 2.8) and other.score("c2") == pytest.approx(2.08 / 2.8)


def test_never_raises_with_few_active_rows_and_stands_down_beyond_f():
    U = skewed_round(0, n=5, skewed=(), flipper=None)
    rep = Reputation(use_validation=False, f=2)
    rep.scores = {"c0": 0.1, "c1": 0.2, "c2": 0.9}
    rep.quarantined = {"c0", "c1"}
    _, w, report = rep(U, torch.ones(5), simple_round_context(U))  # n=5 > 2f: room for both
    assert report.reasons == {0: "quarantined", 1: "quarantined"} and report.info["stood_down"] == []
    w_in = torch.ones(5)
    w_in[4] = 0.0  # an earlier layer dropped one row: room for one, the lowest-scored
    _, w, report = rep(U, w_in, simple_round_context(U))
    assert report.reasons == {0: "quarantined"} and report.info["stood_down"] == ["c1"]
    assert int((w == 0).sum()) == 2 and float(w[1]) > 0
    w_gone = torch.ones(5)
    w_gone[[1, 4]] = 0.0  # c1's row and another already dropped: c1 is held at no cost, c0 stands down
    _, w, report = rep(U, w_gone, simple_round_context(U))
    assert report.reasons == {1: "quarantined"} and report.info["stood_down"] == ["c0"]
    assert int((w == 0).sum()) == 2
    w_in[3] = 0.0  # two dropped: active rows 3 <= 2f, no room at all, and still no error
    _, w, report = rep(U, w_in, simple_round_context(U))
    assert report.reasons == {} and report.info["stood_down"] == ["c0", "c1"]
    _, w, report = rep(U[:2], torch.ones(2), simple_round_context(U[:2]))  # n=2, f=2
    assert w.shape == (2,)
    # learning from a round with at most 2f judged rows: the median may be an attacker's; unchanged
    before = dict(rep.scores)
    rep.observe(U[:4], torch.ones(4), U[:4].mean(0), simple_round_context(U[:4]), torch.zeros(4, dtype=torch.bool))
    assert rep.scores == {**before, "c3": rep.prior}
    # a whole pipeline with a sign-filter-like layer dropping f rows every round never aborts
    rep2 = Reputation(use_validation=False, f=2)
    status = run(rep2, 6, make=lambda r: skewed_round(r, n=5, skewed=(), flipper=0), layers=[Reject([3, 4], "sign_cluster")])
    assert status[-1] == {"c0"}


def test_a_client_sent_twice_is_judged_once_and_a_zero_aggregate_teaches_nothing():
    rep = Reputation(use_validation=False)
    U = skewed_round(0, skewed=(), flipper=None)
    ctx = simple_round_context(U)
    ctx.client_ids[7] = "c6"
    rep.observe(U, torch.ones(12), U.mean(0), ctx, torch.zeros(12, dtype=torch.bool))
    assert len(rep.history["c6"]) == 1
    rep.observe(U, torch.ones(12), torch.zeros(D), ctx, torch.zeros(12, dtype=torch.bool))  # a skipped round
    assert rep.history["c1"][1] == rep.history["c1"][0]


def test_reputation_parameters_are_checked():
    for kw, what in [({"agreement": 0.0}, "agreement"), ({"agreement": 1.5}, "agreement"),
                     ({"agreement": True}, "agreement"), ({"decay": "x"}, "decay"), ({"prior": 1.2}, "prior"),
                     ({"z_tolerance": 0}, "z_tolerance"), ({"f": 1.5}, "f")]:
        with pytest.raises(PhalanxError, match=f"reputation: {what} must be"):
            Reputation(**kw)
    assert DEFENSES.build("reputation", agreement=0.5).agreement == 0.5


def test_state_round_trip_through_json_with_validation_and_standing_down():
    def make(r):
        U = skewed_round(r, n=8, skewed=(6, 7), flipper=0)
        U[1] = -U[1]
        U[2] = U[2] * 20
        return U

    def step(pipe, r):
        U = make(r)
        w = torch.ones(8)
        w[3 + r % 3] = 0.0  # an earlier layer drops a row now and then: the cap bites
        ctx = simple_round_context(U, round=r, val_loss=lambda p: float((p - 1.0).square().mean()))
        g, report = pipe(U, w, ctx)
        rep = report.info["reports"][0]
        return g, rep.scores.clone(), sorted(rep.reasons.items()), rep.info["stood_down"]

    params = {"f": 2, "agreement": 0.3, "decay": 0.6}
    straight, first = Reputation(**params), Reputation(**params)
    pipe_s, pipe_1 = Pipeline([straight], Mean()), Pipeline([first], Mean())
    for r in range(4):
        step(pipe_s, r), step(pipe_1, r)
    state = json.loads(json.dumps(pipe_1.state_dict()))
    assert state["0:reputation"]["quarantined"]
    resumed = Reputation(**params)
    pipe_r = Pipeline([resumed], Mean())
    pipe_r.load_state_dict(state)
    stood = []
    for r in range(4, 10):
        a, b = step(pipe_s, r), step(pipe_r, r)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:], r
        stood.append(a[3])
    assert resumed.state_dict() == straight.state_dict()
    assert straight.quarantined <= {"c0", "c1", "c2"} and len(straight.quarantined) == 2


def test_judged_by_its_own_record_an_attackers_good_rounds_do_not_buy_it_back_nor_an_honest_streak_quarantine_it():
    def make(r):
        U = skewed_round(r, skewed=(), flipper=None)
        if r not in (6, 7):  # client 0 sign-flips, except for two rounds in a row
            U[0] = -U[0]
        if 8 <= r < 12:  # client 1, honest for 8 rounds, then four bad rounds in a row
            U[1] = -U[1]
        return U

    rep = Reputation(use_validation=False, f=3)
    status = run(rep, 14, make=make)
    first = next(r for r, q in enumerate(status) if "c0" in q)
    assert first <= 2 and all("c0" in q for q in status[first:])
    assert not any("c1" in q for q in status) and rep.score("c1") > rep.threshold
    ema = 0.6  # the moving average this replaces (r <- 0.7 r + 0.3 c) would have quarantined client 1
    for r in range(12):
        ema = 0.7 * ema + 0.3 * (0.0 if r >= 8 else 1.0)
    assert ema < rep.threshold


def test_state_evidence_is_checked_and_older_checkpoints_without_it_load():
    old = {"scores": {"c0": 0.2, "c1": 0.9}, "quarantined": ["c0"], "history": {"c0": [0.2], "c1": [0.9]}}
    rep = Reputation()
    rep.load_state_dict(old)
    assert rep.evidence == {} and rep._evidence("c1") == pytest.approx((1.8, 0.2))
    good = {**old, "evidence": {"c0": [0.4, 1.6], "c1": [1.8, 0.2]}}
    rep.load_state_dict(good)
    assert rep.state_dict() == good
    for bad in [{"c0": [0.4]}, {"c0": [-1.0, 1.0]}, {"c9": [1.0, 1.0]}, {"c0": "x"}, [1, 2],
                {"c0": [float("inf"), 1.0]}]:
        with pytest.raises(PhalanxError, match="reputation: state evidence"):
            Reputation().load_state_dict({**old, "evidence": bad})
    with pytest.raises(PhalanxError, match="reputation: prior_weight must be"):
        Reputation(prior_weight=0)


def float64_contributions(rep, U, g, judged):
    """The rule as first written: a float64 copy of the judged rows, torch's (lower) median."""
    from phalanx.defenses.reputation import one_sided_z

    A, g64 = U[judged].double(), g.double()
    norms = A.norm(dim=1)

    def cosines(ref_dir):
        cos = (A @ ref_dir) / (norms * ref_dir.norm()).clamp_min(1e-12)
        return cos, float(cos.median())

    cos, ref = cosines(g64)
    if not ref > 1e-6:
        cos, ref = cosines(A.median(dim=0).values)
    if not ref > 1e-6:
        return None
    a = rep.agreement
    term = ((cos / ref + a) / (2 * a)).clamp(0, 1) * torch.exp(-(one_sided_z(norms) - rep.z_tolerance).clamp_min(0))
    c = torch.full((U.shape[0],), float("nan"), dtype=torch.float64)
    c[judged] = term
    return c


@pytest.mark.parametrize("pulled_over", [False, True])
def test_contributions_from_one_float32_pass_match_a_float64_copy(pulled_over):
    g = torch.Generator().manual_seed(7)
    d = 70_001  # not a multiple of the column blocks
    U = 3.0 + torch.randn(30, d, generator=g)
    U[:6] = -4.0 * U[:6]  # sign flippers with large norms
    U[6] *= 40.0  # a norm outlier
    judged = torch.ones(30, dtype=torch.bool)
    judged[[3, 11]] = False
    agg = -U[judged].mean(0) if pulled_over else U[judged].mean(0)  # pulled over: the median fallback
    rep = Reputation(use_validation=False, f=5)
    got = rep.contributions(U, agg, simple_round_context(U), judged)
    want = float64_contributions(rep, U, agg, judged)
    assert torch.isnan(got[~judged]).all()
    assert torch.allclose(got[judged], want[judged], rtol=0, atol=1e-6)
    assert float(got[0]) < 0.01 and float(got[20]) > 0.99


def test_reputation_scores_and_quarantine_match_the_float64_rule_over_rounds():
    class Reference(Reputation):
        def contributions(self, U, g, ctx, judged, stats=None):
            return float64_contributions(self, U, g, judged)

    fast, slow = Reputation(use_validation=False, f=3), Reference(use_validation=False, f=3)
    status_fast, status_slow = run(fast, 8), run(slow, 8)
    assert status_fast == status_slow and "c0" in status_fast[-1]
    assert fast.scores.keys() == slow.scores.keys()
    for cid in fast.scores:
        assert fast.history[cid] == pytest.approx(slow.history[cid], abs=1e-6)
