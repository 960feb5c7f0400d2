"""Aggregator-aware attacks search against the server's whole pipeline (ctx.aggregator), layers
included: what they choose changes with the layers, their rows get through the layers, and the
simulations leave every stateful stage as it was. Also the AGR-tailored Min-Max / Min-Sum."""

import pytest
import torch

import phalanx.attacks  # noqa: F401  (registers the attacks)
import phalanx.defenses  # noqa: F401
from phalanx.attacks.fang import picks_crafted
from phalanx.context import AttackContext, simple_round_context
from phalanx.defenses.base import Report
from phalanx.defenses.pipeline import build_defense
from phalanx.errors import PhalanxError
from phalanx.registry import ATTACKS

H, M, D = 20, 5, 1000


def make_ctx(own, n, seed=0, round=0, aggregator=None):
    return AttackContext(own=own, n=n, round=round, generator=torch.Generator().manual_seed(seed),
                         global_params=torch.zeros(own.shape[1]), aggregator=aggregator)


def synthetic(seed=0, h=H, m=M, d=D, mean_scale=0.2):
    g = torch.Generator().manual_seed(seed)
    mu = mean_scale * torch.randn(d, generator=g)
    rows = mu + torch.randn(h + m, d, generator=g)
    return rows[:h], rows[h:], mu


def served(pipe, honest, crafted):
    """(|aggregate - honest mean|, crafted rows discarded) when ``pipe`` aggregates [honest; crafted]."""
    U = torch.cat([honest, crafted])
    g, rep = pipe(U, torch.ones(U.shape[0]), simple_round_context(U))
    return float((g.double() - honest.double().mean(0)).norm()), rep.discarded()[honest.shape[0]:]


def attack_against(name, params, items, seed=0):
    honest, own, _ = synthetic(seed=seed)
    pipe = build_defense(items, f=M)
    attack = ATTACKS.build(name, **params)
    crafted = attack(honest, make_ctx(own, n=H + M, seed=seed, aggregator=pipe))
    return attack.last, crafted, honest, pipe


# ---- the optimal variants see the layers ------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_ipm_optimal_stops_where_a_clip_layer_caps_its_rows(seed):
    last, _, honest, _ = attack_against("ipm", {"variant": "optimal"}, ["mean"], seed)
    assert last["epsilon"] == 10.0  # against a plain mean, the larger the further
    clipped, _, honest, _ = attack_against("ipm", {"variant": "optimal"}, [{"clip": {"max_norm": 2.0}}, "mean"], seed)
    # past eps |mu| = 2 the clip layer gives every row the same norm: the search stops at the first
    # grid value (steps of 0.25) that reaches it
    first = min(e for e in torch.linspace(0, 10, 41).tolist() if e * float(honest.mean(0).norm()) >= 2.0)
    assert clipped["epsilon"] == pytest.approx(first)


@pytest.mark.parametrize("name,params,agg", [
    ("ipm", {"variant": "optimal"}, "mean"),
    ("alie", {"variant": "optimal"}, "mean"),
    ("fang_krum", {}, "mean"),
    ("fang_krum", {}, "krum"),
    ("fang_trmean", {"variant": "optimal"}, "trimmed_mean"),
])
def test_search_against_validate_chooses_rows_that_validate_accepts(name, params, agg):
    """Searched against the aggregator alone, each attack sends rows that validate's norm test
    rejects (so behind validate it achieves nothing); searched against [validate, aggregator] it
    picks another value, its rows pass, and the aggregate moves further."""
    plain, crafted, honest, _ = attack_against(name, params, [agg])
    layered, crafted_l, _, pipe = attack_against(name, params, ["validate", agg])
    dev_plain, _ = served(pipe, honest, crafted)
    dev_layered, _ = served(pipe, honest, crafted_l)
    validate = build_defense(["validate", "mean"])
    assert served(validate, honest, crafted)[1].all() and not served(validate, honest, crafted_l)[1].any()
    assert plain != layered
    assert dev_layered > dev_plain * 1.2


def test_alie_optimal_z_stays_inside_the_validate_norm_band():
    last, _, _, _ = attack_against("alie", {"variant": "optimal"}, ["mean"])
    assert last["z"] == 5.0
    layered, crafted, honest, pipe = attack_against("alie", {"variant": "optimal"}, ["validate", "mean"])
    assert 0 < layered["z"] < 5.0
    # the next grid value up (z steps of 0.2) is rejected: the search stopped at the band's edge
    mu, sd = honest.mean(0), honest.std(0)
    _, rejected = served(pipe, honest, (mu + (layered["z"] + 0.2) * sd).expand(M, D))
    assert rejected.all()


def test_fang_krum_is_selected_by_the_whole_pipeline():
    last, crafted, honest, pipe = attack_against("fang_krum", {}, ["validate", "krum"])
    assert last["selected"]
    U = torch.cat([honest, crafted])
    _, rep = pipe(U, torch.ones(H + M), simple_round_context(U))
    assert rep.selected[H:].any() and not rep.selected[:H].any()


def test_picks_crafted_reads_the_report():
    U = torch.zeros(5, 3)
    g = torch.zeros(3)
    rep = Report("x", n=5)
    rep.reject(3, "norm_outlier")
    rep.reject(4, "norm_outlier")
    assert not picks_crafted(rep, g, U, 3)  # both crafted rows (3, 4) discarded
    rep.selected = torch.tensor([False, False, False, False, True])
    rep.reasons.pop(4)
    assert picks_crafted(rep, g, U, 3)
    every = Report("mean", n=5, selected=torch.ones(5, dtype=torch.bool))
    assert picks_crafted(every, g, U, 3)  # nothing discarded: the crafted rows are in the output
    U = torch.tensor([[0.0], [1.0], [5.0]])
    silent = Report("opaque", n=3)  # no per-row verdict: is the row nearest g a crafted one?
    assert picks_crafted(silent, torch.tensor([4.0]), U, 2)
    assert not picks_crafted(silent, torch.tensor([0.4]), U, 2)


def test_simulations_leave_stateful_stages_as_they_were():
    honest, own, _ = synthetic(h=12, m=3, d=80)
    pipe = build_defense(["validate", {"clip": {"max_norm": "quantile"}}, {"reputation": {"f": 3}},
                          "trimmed_mean"], f=3)
    U = torch.cat([honest, own])
    pipe(U, torch.ones(15), simple_round_context(U))  # some state to keep
    state = pipe.state_dict()
    for name, params in (("alie", {"variant": "optimal", "steps": 5}), ("ipm", {"variant": "optimal", "steps": 5}),
                         ("minmax", {"variant": "tailored"}), ("minsum", {"variant": "tailored"}),
                         ("fang_krum", {}), ("fang_trmean", {"variant": "optimal", "steps": 5}),
                         ("stealth", {})):
        ATTACKS.build(name, **params)(honest, make_ctx(own, n=15, aggregator=pipe))
        assert pipe.state_dict() == state, name


# ---- AGR-tailored Min-Max / Min-Sum -------------------------------------------------------------

@pytest.mark.parametrize("name", ["minmax", "minsum"])
@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
@pytest.mark.parametrize("items", [["trimmed_mean"], ["validate", "trimmed_mean"], ["median"]])
def test_tailored_moves_the_server_at_least_as_far_as_agnostic(name, perturbation, items):
    for seed in (0, 1):
        honest, own, _ = synthetic(seed=seed)
        pipe = build_defense(items, f=M)
        agnostic = ATTACKS.build(name, perturbation=perturbation)
        tailored = ATTACKS.build(name, perturbation=perturbation, variant="tailored")
        a = agnostic(honest, make_ctx(own, n=H + M, seed=seed, aggregator=pipe))
        t = tailored(honest, make_ctx(own, n=H + M, seed=seed, aggregator=pipe))
        assert tailored.last["agnostic_gamma"] == agnostic.last["gamma"]
        assert served(pipe, honest, t)[0] >= served(pipe, honest, a)[0] * (1 - 1e-6)


def test_tailored_beats_agnostic_against_trimmed_mean():
    # measured: minmax/std 10.21 (agnostic, gamma 1.02) -> 13.12 (tailored, gamma 5) on seed 0
    for seed in (0, 1):
        honest, own, _ = synthetic(seed=seed)
        pipe = build_defense(["trimmed_mean"], f=M)
        agnostic, tailored = ATTACKS.build("minmax"), ATTACKS.build("minmax", variant="tailored")
        a = agnostic(honest, make_ctx(own, n=H + M, aggregator=pipe))
        t = tailored(honest, make_ctx(own, n=H + M, aggregator=pipe))
        assert served(pipe, honest, t)[0] > 1.2 * served(pipe, honest, a)[0]
        assert tailored.last["gamma"] > agnostic.last["gamma"]


def test_tailored_without_a_server_builds_the_named_aggregator_and_caches_the_search():
    honest, own, _ = synthetic(h=10, m=3, d=50)
    attack = ATTACKS.build("minsum", variant="tailored", aggregator="median", f=3, search_every=2)
    attack(honest, make_ctx(own, n=13, round=0))
    gamma = attack.last["gamma"]
    attack(honest * 2, make_ctx(own, n=13, round=1))  # the searched gamma is reused this round
    assert attack.last["gamma"] == gamma
    assert ATTACKS.build("minmax")(honest, make_ctx(own, n=13)).equal(
        ATTACKS.build("minmax", aggregator="no_such_rule")(honest, make_ctx(own, n=13)))  # unused when agnostic


@pytest.mark.parametrize("name,params,needle", [
    ("minmax", {"variant": "optimal"}, "variant"), ("minsum", {"variant": "tailored", "aggregator": "nope"}, "nope"),
    ("minmax", {"search_every": 0}, "search_every"), ("minsum", {"f": -1}, "f"),
    ("fang_trmean", {"variant": "tailored"}, "variant"), ("fang_trmean", {"steps": 1}, "steps"),
    ("fang_krum", {"steps": 0}, "steps"),
])
def test_bad_search_parameters_are_named(name, params, needle):
    with pytest.raises(PhalanxError, match=f"{needle}.*"):
        ATTACKS.build(name, **params)
