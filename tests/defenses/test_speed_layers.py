"""validate, clip and sign_filter on their fast paths (one norm pass, no copies of U): results
only, against the plain float64 formulas. No timings (those live in benchmarks/aggregators.py)."""

import math

import torch

import phalanx.defenses  # noqa: F401
from phalanx.context import simple_round_context
from phalanx.defenses.clip import Clip
from phalanx.defenses.validate import Validate
from phalanx.registry import DEFENSES


def rows(n=12, d=40000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, n)[:, None]


def test_validate_passes_u_on_uncopied_when_every_row_is_finite():
    U = rows()
    U[3] *= 50  # a norm outlier is rejected by weight, not by rewriting U
    V, w, rep = Validate()(U, torch.ones(12), simple_round_context(U))
    assert V is U and rep.reasons == {3: "norm_outlier"}
    norms = U.double().norm(dim=1)
    ok = w > 0
    assert math.isclose(rep.info["median_norm"], float(norms[ok].median()), rel_tol=1e-6)


def test_validate_zeroes_non_finite_rows_in_a_copy():
    U = rows()
    U[2, 100] = math.nan
    U[7, -1] = -math.inf
    before = U.clone()
    V, w, rep = Validate()(U, torch.ones(12), simple_round_context(U))
    assert V is not U and torch.equal(U.nan_to_num(), before.nan_to_num())
    assert rep.reasons[2] == "nonfinite" and rep.reasons[7] == "nonfinite"
    assert bool((V[[2, 7]] == 0).all()) and bool(torch.isfinite(V).all())
    keep = [i for i in range(12) if i not in (2, 7)]
    assert torch.equal(V[keep], U[keep])


def test_clip_scales_in_float64_and_copies_unclipped_rows_bit_for_bit():
    U = rows()
    w = torch.ones(12)
    w[5] = 0
    V, _, rep = Clip(max_norm="auto")(U, w, simple_round_context(U))
    norms = U.double().norm(dim=1)
    active = w > 0
    bound = float(norms[active].median())
    assert math.isclose(rep.info["norm_bound"], bound, rel_tol=1e-6)
    scale = torch.clamp(bound / norms, max=1.0)
    ref = (U.double() * scale[:, None]).float()
    for i in range(12):
        if not bool(active[i]) or float(scale[i]) == 1.0:
            assert torch.equal(V[i], U[i]), i
        else:
            assert torch.allclose(V[i], ref[i], rtol=2e-6, atol=0), i
    assert float(V[active].double().norm(dim=1).max()) <= bound * (1 + 1e-6)


def test_clip_passes_u_on_uncopied_when_nothing_is_clipped():
    U = rows()
    V, _, rep = Clip(max_norm=1e9)(U, torch.ones(12), simple_round_context(U))
    assert V is U and rep.info["clipped"] == 0


def test_sign_filter_reads_only_live_finite_rows():
    U = rows()
    U[:3] = -U[:3].abs()  # sign flippers: mostly negative
    U[4, 10] = math.nan  # a non-finite row is left to validate
    w = torch.ones(12)
    w[9] = 0
    layer = DEFENSES.build("sign_filter", coords=0.5, f=3)
    V, w2, rep = layer(U, w, simple_round_context(U))
    assert V is U
    assert set(rep.reasons) == {0, 1, 2}
    assert float(w2[4]) == 1.0 and float(w2[9]) == 0.0


def test_scale_rows_rounds_float64_products_once():
    from phalanx.defenses.clip import scale_rows

    U = rows(n=7, d=90_001)
    s = torch.tensor([1.0, 0.3, 1.0, 1 / 3, 0.999999, 1.0, 1e-3], dtype=torch.float64)
    assert torch.equal(scale_rows(U, s), (U.double() * s[:, None]).float())
    assert torch.equal(scale_rows(U.double(), s), U.double() * s[:, None])
