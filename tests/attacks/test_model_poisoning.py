"""Simple model-poisoning attacks: shapes, dtype, determinism, exact small cases, validation."""

import math

import pytest
import torch

import phalanx.attacks  # noqa: F401  (registers the attacks)
from phalanx.context import AttackContext
from phalanx.errors import PhalanxError
from phalanx.registry import ATTACKS

SIMPLE = ["gaussian", "sign_flip", "scaling", "zero", "nonfinite"]


def make_ctx(own, n=10, seed=0):
    return AttackContext(own=own, n=n, round=0, generator=torch.Generator().manual_seed(seed),
                         global_params=torch.zeros(own.shape[1]))


def rows(h, d, seed=1, dtype=torch.float32):
    return torch.randn(h, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", SIMPLE)
def test_shape_dtype_and_determinism(name):
    attack = ATTACKS.build(name)
    own = rows(3, 17, dtype=torch.float64)  # float64 in, float32 out
    honest = rows(7, 17, seed=2)
    a = attack(honest, make_ctx(own, seed=5))
    b = attack(honest, make_ctx(own, seed=5))
    assert a.shape == (3, 17) and a.dtype == torch.float32
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert not attack.omniscient


def test_gaussian_depends_on_seed_and_center():
    own = rows(4, 2000)
    pure = ATTACKS.build("gaussian", scale=3.0)(own, make_ctx(own, seed=1))
    other = ATTACKS.build("gaussian", scale=3.0)(own, make_ctx(own, seed=2))
    assert not torch.equal(pure, other)
    assert abs(pure.std().item() - 3.0) < 0.1 and abs(pure.mean().item()) < 0.1
    around = ATTACKS.build("gaussian", scale=3.0, center="own")(own, make_ctx(own, seed=1))
    assert torch.allclose(around - own, pure)  # same draws, shifted by own


def test_sign_flip_and_scaling_exact():
    own = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -4.0]])
    ctx = make_ctx(own)
    assert torch.equal(ATTACKS.build("sign_flip")(own, ctx), -own)
    assert torch.equal(ATTACKS.build("sign_flip", scale=2.5)(own, ctx),
                       torch.tensor([[-2.5, 5.0, -1.25], [0.0, -7.5, 10.0]]))
    assert torch.equal(ATTACKS.build("scaling", factor=-3)(own, ctx),
                       torch.tensor([[-3.0, 6.0, -1.5], [0.0, -9.0, 12.0]]))
    assert torch.equal(ATTACKS.build("scaling")(own, ctx), 10 * own)
    assert torch.equal(ATTACKS.build("zero")(own, ctx), torch.zeros(2, 3))


@pytest.mark.parametrize("kind,check", [("nan", torch.isnan), ("inf", lambda t: t == math.inf),
                                        ("-inf", lambda t: t == -math.inf)])
def test_nonfinite_kinds(kind, check):
    own = rows(3, 40)
    out = ATTACKS.build("nonfinite", kind=kind)(own, make_ctx(own))
    assert check(out).all()
    part = ATTACKS.build("nonfinite", kind=kind, fraction=0.25)(own, make_ctx(own))
    bad = ~torch.isfinite(part)
    assert bad.sum(1).tolist() == [10, 10, 10]  # exactly a quarter of each row
    assert check(part[bad]).all() and torch.equal(part[~bad], own[~bad])


def test_empty_attacker_set():
    own = torch.zeros(0, 5)
    for name in SIMPLE:
        assert ATTACKS.build(name)(rows(4, 5), make_ctx(own)).shape == (0, 5)


@pytest.mark.parametrize("name,params,needle", [
    ("gaussian", {"scale": 0}, "scale"), ("gaussian", {"scale": float("nan")}, "scale"),
    ("gaussian", {"center": "mean"}, "center"), ("sign_flip", {"scale": -1}, "scale"),
    ("scaling", {"factor": "big"}, "factor"), ("scaling", {"factor": math.inf}, "factor"),
    ("nonfinite", {"kind": "zero"}, "kind"), ("nonfinite", {"fraction": 1.5}, "fraction"),
])
def test_bad_parameters_are_named(name, params, needle):
    with pytest.raises(PhalanxError, match=f"{name}: {needle}.*got"):
        ATTACKS.build(name, **params)


def test_width_mismatch_is_an_error():
    own = rows(2, 5)
    with pytest.raises(PhalanxError, match="sign_flip: honest rows"):
        ATTACKS.build("sign_flip")(rows(3, 6), make_ctx(own))
