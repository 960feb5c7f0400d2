"""Simple (non-omniscient) model-poisoning attacks: they read only the malicious clients' own rows.

Each factory checks its hyperparameters when it is built and returns an :class:`Attack` that maps
``(honest [h, d], ctx) -> [m, d]`` float32. These attacks ignore ``honest`` (beyond its width).

* ``gaussian``  -- random noise N(0, scale^2), either pure noise (``center="zero"``, the Gaussian
  attack of Blanchard et al. 2017 / Xie et al. 2018) or around the client's own update
  (``center="own"``).
* ``sign_flip`` -- ``-scale * own`` (Damaskinos et al. 2018; Allen-Zhu et al. 2021).
* ``scaling``   -- ``factor * own`` (boosting, Bhagoji et al. 2019).
* ``zero``      -- all-zero rows (a free-rider that drags the mean toward zero).
* ``nonfinite`` -- NaN or +-Inf entries, to exercise the validation layer.

The small helpers at the bottom (parameter checks, input checks) are shared with ``adaptive.py``.
"""

from __future__ import annotations

import math

import torch

from ..context import AttackContext
from ..errors import PhalanxError
from ..registry import ATTACKS
from .base import Attack


class Gaussian(Attack):
    """Rows drawn from N(center, scale^2 I); center is 0 (pure noise) or the client's own update."""

    name = "gaussian"

    def __init__(self, scale: float, center: str):
        self.scale, self.center = scale, center

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        own = check_inputs(self.name, honest, ctx)
        noise = torch.randn(own.shape, generator=ctx.generator, dtype=torch.float32) * self.scale
        return noise + own if self.center == "own" else noise

    def __repr__(self) -> str:
        return f"Gaussian(scale={self.scale}, center={self.center!r})"


class Scaled(Attack):
    """Rows ``factor * own``: sign flipping when factor < 0, boosting when |factor| > 1."""

    def __init__(self, name: str, factor: float):
        self.name, self.factor = name, factor

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return check_inputs(self.name, honest, ctx) * self.factor

    def __repr__(self) -> str:
        return f"Scaled(name={self.name!r}, factor={self.factor})"


class Zero(Attack):
    """All-zero rows."""

    name = "zero"

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return torch.zeros_like(check_inputs(self.name, honest, ctx))


class NonFinite(Attack):
    """Rows whose entries (all, or a random ``fraction`` of them) are NaN, +Inf or -Inf."""

    name = "nonfinite"
    _VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

    def __init__(self, kind: str, fraction: float):
        self.kind, self.fraction = kind, fraction

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        own = check_inputs(self.name, honest, ctx)
        m, d = own.shape
        k = max(1, round(self.fraction * d)) if d else 0
        if k == d:
            return torch.full_like(own, self._VALUES[self.kind])
        # k positions per row, chosen uniformly without replacement (row-wise argsort of noise)
        keys = torch.rand((m, d), generator=ctx.generator)
        pos = keys.argsort(dim=1)[:, :k]
        out = own.clone()
        out.scatter_(1, pos, self._VALUES[self.kind])
        return out

    def __repr__(self) -> str:
        return f"NonFinite(kind={self.kind!r}, fraction={self.fraction})"


@ATTACKS.register("gaussian")
def gaussian(scale: float = 1.0, center: str = "zero") -> Attack:
    """Gaussian noise with std ``scale``; ``center``: "zero" (pure noise) or "own" (own + noise)."""
    check_number("gaussian", "scale", scale, positive=True)
    check_choice("gaussian", "center", center, ("zero", "own"))
    return Gaussian(float(scale), center)


@ATTACKS.register("sign_flip")
def sign_flip(scale: float = 1.0) -> Attack:
    """Sign flipping: send ``-scale * own``."""
    check_number("sign_flip", "scale", scale, positive=True)
    return Scaled("sign_flip", -float(scale))


@ATTACKS.register("scaling")
def scaling(factor: float = 10.0) -> Attack:
    """Scaling (boosting): send ``factor * own``."""
    check_number("scaling", "factor", factor)
    return Scaled("scaling", float(factor))


@ATTACKS.register("zero")
def zero() -> Attack:
    """Send all-zero rows."""
    return Zero()


@ATTACKS.register("nonfinite")
def nonfinite(kind: str = "nan", fraction: float = 1.0) -> Attack:
    """Non-finite rows: ``kind`` "nan", "inf" or "-inf" in a ``fraction`` of each row's entries."""
    check_choice("nonfinite", "kind", kind, tuple(NonFinite._VALUES))
    check_number("nonfinite", "fraction", fraction, positive=True)
    if fraction > 1:
        raise PhalanxError(f"nonfinite: fraction must be in (0, 1], got {fraction!r}")
    return NonFinite(kind, float(fraction))


# ---- shared checks ---------------------------------------------------------------------------

def check_number(name: str, param: str, value, positive: bool = False, nonneg: bool = False) -> float:
    """A finite real number (optionally > 0 or >= 0), else a PhalanxError naming the parameter."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and nonneg:
        ok = value >= 0
    if not ok:
        what = "a finite number > 0" if positive else "a finite number >= 0" if nonneg else "a finite number"
        raise PhalanxError(f"{name}: {param} must be {what}, got {value!r}")
    return float(value)


def check_int(name: str, param: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PhalanxError(f"{name}: {param} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, param: str, value, choices: tuple) -> str:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise PhalanxError(f"{name}: {param} must be one of {allowed}, got {value!r}")
    return value


def check_inputs(name: str, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Check that honest [h, d] and ctx.own [m, d] agree; return own as float32."""
    own = ctx.own
    if own.ndim != 2:
        raise PhalanxError(f"{name}: ctx.own must be a matrix [m, d], got shape {tuple(own.shape)}")
    if honest.ndim != 2 or honest.shape[1] != own.shape[1]:
        raise PhalanxError(f"{name}: honest rows must be [h, {own.shape[1]}] like ctx.own, "
                           f"got shape {tuple(honest.shape)}")
    return own.to(torch.float32)
