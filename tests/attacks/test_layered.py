"""Attacks aimed at layered defenses: on_off (reputation and quarantine) and stealth (norm, sign
and cosine filters). Each test asserts what the threat model promises."""

import pytest
import torch

import phalanx.attacks  # noqa: F401  (registers the attacks)
import phalanx.defenses  # noqa: F401
from phalanx.attacks.base import TrainingInfo
from phalanx.attacks.layered import STATS, row_stats, signs_like
from phalanx.context import AttackContext, RoundContext, simple_round_context
from phalanx.defenses.base import Report
from phalanx.defenses.pipeline import build_defense
from phalanx.errors import PhalanxError
from phalanx.registry import ATTACKS

H, M, D = 20, 5, 1000


def make_ctx(own, n, seed=0, round=0, history=None, aggregator=None):
    return AttackContext(own=own, n=n, round=round, generator=torch.Generator().manual_seed(seed),
                         global_params=torch.zeros(own.shape[1]), aggregator=aggregator,
                         history={} if history is None else history)


def synthetic(seed=0, h=H, m=M, d=D, mean_scale=0.2):
    """Honest rows and the attackers' own rows, N(mu, I) around a common mean (noise dominates)."""
    g = torch.Generator().manual_seed(seed)
    mu = mean_scale * torch.randn(d, generator=g)
    rows = mu + torch.randn(h + m, d, generator=g)
    return rows[:h], rows[h:], mu


# ---- on_off ------------------------------------------------------------------------------------

def test_on_off_is_honest_in_warmup_and_off_rounds_and_attacks_in_on_rounds():
    honest, own, _ = synthetic(h=6, m=2, d=30)
    attack = ATTACKS.build("on_off", honest_rounds=3, on=2, off=1, attack="scaling", params={"factor": -4.0})
    history = {}
    phases = []
    for rnd in range(10, 22):  # the attack first runs at round 10: its clock starts there
        out = attack(honest, make_ctx(own, n=8, round=rnd, history=history))
        phases.append(attack.last["phase"])
        expected = own * -4.0 if attack.last["phase"] == "on" else own
        assert torch.equal(out, expected), rnd
    assert phases == ["warmup"] * 3 + ["on", "on", "off"] * 3
    assert history["on_off_start"] == 10
    # a resumed run (history restored from a checkpoint) keeps the same clock
    resumed = ATTACKS.build("on_off", honest_rounds=3, on=2, off=1, attack="scaling", params={"factor": -4.0})
    resumed(honest, make_ctx(own, n=8, round=16, history=dict(history)))
    assert resumed.last["phase"] == "on"


def test_on_off_without_off_rounds_attacks_every_round_after_warmup():
    honest, own, _ = synthetic(h=6, m=2, d=30)
    attack, history = ATTACKS.build("on_off", honest_rounds=1, off=0), {}
    outs = [attack(honest, make_ctx(own, n=8, round=r, history=history)) for r in range(4)]
    assert torch.equal(outs[0], own) and all(torch.equal(o, -own) for o in outs[1:])


def test_on_off_passes_the_inner_attacks_context_and_training_hook_only_when_on():
    honest, own, _ = synthetic(h=6, m=2, d=30)
    attack = ATTACKS.build("on_off", honest_rounds=1, on=1, off=1, attack="alie", params={"z": 1.0})
    assert attack.omniscient  # the inner attack reads the honest rows
    history = {}
    attack(honest, make_ctx(own, n=8, round=0, history=history))
    out = attack(honest, make_ctx(own, n=8, round=1, history=history))
    assert torch.allclose(out[0], honest.mean(0) + honest.std(0), atol=1e-5)
    assert attack.last == {"phase": "on", "z": 1.0}
    hooked = ATTACKS.build("on_off", honest_rounds=1, on=1, off=1, attack="constrain_scale")
    info = lambda r: TrainingInfo(r, "c7", torch.zeros(30), history)  # noqa: E731
    history = {}
    assert [hooked.training_hook(info(r)) is None for r in range(4)] == [True, False, True, False]
    assert not ATTACKS.build("on_off").omniscient


def test_on_off_stays_out_of_quarantine_where_a_steady_attack_is_quarantined():
    """Against reputation (quarantine under 0.3, release over 0.5), IPM every round (rows against
    the honest mean) gets attackers quarantined; the on-off attacker running the same IPM in
    bursts of 2 (after 5 honest rounds, 3 honest rounds between bursts) is never quarantined, and
    every one of its attack rows reaches the aggregator. (Sign flipping these synthetic attackers'
    own rows gives rows nearly orthogonal to the honest mean, which reputation rightly does not
    tell from a label-skewed honest client.)"""
    ids = [f"h{i}" for i in range(H)] + [f"a{i}" for i in range(M)]

    def play(attack, rounds=20):
        pipe = build_defense([{"reputation": {"use_validation": False}}, "mean"], f=M)
        history, quarantined, accepted_on = {}, set(), 0
        for rnd in range(rounds):
            honest, own, _ = synthetic(seed=rnd)
            rows = attack(honest, make_ctx(own, n=H + M, round=rnd, history=history))
            U = torch.cat([honest, rows])
            ctx = RoundContext(rnd, ids, torch.zeros(D), torch.Generator().manual_seed(rnd))
            _, rep = pipe(U, torch.ones(H + M), ctx)
            quarantined |= {ids[r] for r, why in rep.reasons.items() if "quarantined" in why}
            if getattr(attack, "last", {}).get("phase") == "on":
                accepted_on += int((~rep.discarded()[H:]).sum())
        return quarantined, accepted_on

    steady, _ = play(ATTACKS.build("ipm", epsilon=0.5))
    assert steady and steady <= {f"a{i}" for i in range(M)}
    on_off, accepted = play(ATTACKS.build("on_off", honest_rounds=5, on=2, off=3, attack="ipm",
                                          params={"epsilon": 0.5}))
    assert not on_off
    assert accepted == M * 2 * 3  # rounds 5-6, 10-11, 15-16: every attack row accepted


@pytest.mark.parametrize("params,needle", [
    ({"honest_rounds": -1}, "honest_rounds"), ({"on": 0}, "on"), ({"off": 1.5}, "off"),
    ({"attack": 3}, "attack"), ({"attack": "nope"}, "attack 'nope'"),
    ({"params": [1]}, "params"), ({"params": {"factor": "x"}, "attack": "scaling"}, "attack 'scaling'"),
    ({"attack": "sign_flip", "params": {"bogus": 1}}, "attack 'sign_flip'"),
])
def test_on_off_bad_parameters_are_named(params, needle):
    with pytest.raises(PhalanxError, match=f"on_off: {needle}.*got"):
        ATTACKS.build("on_off", **params)


# ---- stealth -----------------------------------------------------------------------------------

def honest_range(honest):
    S = row_stats(honest, honest, honest=True)
    return S.min(0).values, S.max(0).values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stealth_rows_look_honest_on_every_statistic(seed):
    honest, own, mu = synthetic(seed=seed)
    attack = ATTACKS.build("stealth", band=0.0)
    out = attack(honest, make_ctx(own, n=H + M, seed=seed))
    assert out.shape == (M, D) and out.dtype == torch.float32 and torch.equal(out[0], out[-1])
    assert not attack.last["fallback"]
    lo, hi = honest_range(honest)
    s = row_stats(out[:1], honest)[0]
    for k, name in enumerate(STATS):
        assert lo[k] - 1e-9 <= s[k] <= hi[k] + 1e-9, (name, float(lo[k]), float(s[k]), float(hi[k]))
    # the same by hand, with the leave-one-out cosines the honest range is made of
    H64, r = honest.double(), out[0].double()
    norms = H64.norm(dim=1)
    assert norms.min() <= r.norm() <= norms.max()
    for frac in (lambda x: (x > 0).double().mean(-1), lambda x: (x < 0).double().mean(-1)):
        assert frac(H64).min() <= frac(r) <= frac(H64).max()
    others = (H64.sum(0) - H64) / (H - 1)
    loo = torch.nn.functional.cosine_similarity(H64, others, dim=1)
    cos = torch.nn.functional.cosine_similarity(r, H64.mean(0), dim=0)
    assert loo.min() <= cos <= loo.max()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stealth_moves_the_mean_against_the_benign_direction(seed):
    honest, own, mu = synthetic(seed=seed)
    out = ATTACKS.build("stealth")(honest, make_ctx(own, n=H + M, seed=seed))
    benign = honest.mean(0)
    g_attacked = torch.cat([honest, out]).mean(0)
    g_benign = torch.cat([honest, own]).mean(0)  # had the attackers sent their own updates
    assert float((g_attacked - g_benign) @ benign) < 0
    assert float((g_attacked - benign) @ benign) < 0
    assert float(out[0] @ benign) < 0.5 * float(benign @ benign)  # under half an average honest row's progress


def test_stealth_passes_the_filters_that_stop_alie_and_ipm():
    honest, own, _ = synthetic(seed=0)
    for items in (["validate", "mean"], ["flame"], ["validate", {"reputation": {"f": M}}, "trimmed_mean"]):
        pipe = build_defense(items, f=M)
        state = pipe.state_dict()
        stealth = ATTACKS.build("stealth")
        out = stealth(honest, make_ctx(own, n=H + M, aggregator=pipe))
        assert pipe.state_dict() == state  # simulations left the server as it was
        U = torch.cat([honest, out])
        _, rep = pipe(U, torch.ones(H + M), simple_round_context(U))
        assert not rep.discarded()[H:].any(), items
    pipe = build_defense(["validate", "mean"], f=M)
    for name, params in (("alie", {"z": 3.0}), ("ipm", {"epsilon": 0.5})):
        U = torch.cat([honest, ATTACKS.build(name, **params)(honest, make_ctx(own, n=H + M))])
        assert pipe(U, torch.ones(H + M), simple_round_context(U))[1].discarded()[H:].all()


def test_stealth_with_a_server_that_rejects_every_crafted_row_falls_back_to_an_honest_row():
    honest, own, mu = synthetic(h=8, m=2, d=200)
    calls = []

    def paranoid(U, w, ctx):  # discards rows 8 and 9, the crafted ones
        calls.append(1)
        rep = Report("paranoid", n=U.shape[0])
        rep.reject(8, "no")
        rep.reject(9, "no")
        return U[:8].mean(0), rep

    attack = ATTACKS.build("stealth", grid=4, steps=3)
    out = attack(honest, make_ctx(own, n=10, aggregator=paranoid))
    assert attack.last["fallback"] and 1 <= len(calls) <= 4  # grid points in band only, no bisection
    worst = int((honest.double() @ honest.double().mean(0)).argmin())
    assert torch.equal(out, honest[worst].expand(2, 200))


def test_stealth_is_deterministic_and_pure():
    honest, own, _ = synthetic(h=10, m=3, d=100)
    h0, o0 = honest.clone(), own.clone()
    a = ATTACKS.build("stealth", perturbation="std")(honest, make_ctx(own, n=13))
    b = ATTACKS.build("stealth", perturbation="std")(honest, make_ctx(own, n=13))
    assert torch.equal(a, b) and torch.equal(honest, h0) and torch.equal(own, o0)
    assert torch.isfinite(a).all()


def test_stealth_keeps_the_honest_zero_fraction():
    honest, own, _ = synthetic(seed=3, h=12, m=2, d=400)
    honest = honest.clone()
    g = torch.Generator().manual_seed(0)
    honest[torch.rand(honest.shape, generator=g) < 0.2] = 0  # 20% zeros, at different places per row
    attack = ATTACKS.build("stealth", band=0.0)
    out = attack(honest, make_ctx(own, n=14))
    zeros = (honest == 0).double().mean(1)
    assert not attack.last["fallback"]
    assert zeros.min() <= (out[0] == 0).double().mean() <= zeros.max()


def test_signs_like_by_hand():
    v = torch.tensor([3.0, -1.0, 0.5, -2.0, 0.1])
    assert torch.equal(signs_like(v, 3, 1), torch.tensor([3.0, 0.0, 0.5, -2.0, 0.1]))
    tiny = 1e-3 * 6.6 / 5
    out = signs_like(v, 4, 1)  # -1 ranks 4th: it must turn positive, by as little as possible
    assert torch.allclose(out, torch.tensor([3.0, tiny, 0.5, -2.0, 0.1]))
    assert torch.equal(signs_like(v, 0, 0), torch.zeros(5))


def test_stealth_in_a_federation_gets_through_validate_and_is_deterministic(tiny_config):
    from phalanx.config import parse_config
    from phalanx.federation import Federation

    tiny_config["federation"]["num_clients"] = 10
    tiny_config.update(attack={"name": "stealth", "byzantine": 2}, defense=["validate", "mean"])

    def run():
        fed, rows = Federation(parse_config(tiny_config)), []
        fed.run(on_round=lambda r: rows.append((r.metrics["rejected"], dict(fed.attack.last))))
        return fed.params, rows

    params, rows = run()
    assert len(rows) == 3 and all(rejected == 0 and not last["fallback"] for rejected, last in rows)
    again, rows_again = run()
    assert torch.equal(params, again) and rows == rows_again


@pytest.mark.parametrize("params,needle", [
    ({"perturbation": "unit"}, "perturbation"), ({"band": 0.5}, "band"), ({"band": -0.1}, "band"),
    ({"norm": "max"}, "norm"), ({"grid": 1}, "grid"), ({"steps": -1}, "steps"), ({"f": -2}, "f"),
    ({"aggregator": 3}, "aggregator"),
])
def test_stealth_bad_parameters_are_named(params, needle):
    with pytest.raises(PhalanxError, match=f"stealth: {needle}.*got"):
        ATTACKS.build("stealth", **params)
