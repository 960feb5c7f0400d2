"""Omniscient model-poisoning attacks: they read the honest rows, and some simulate the server.

* ``alie``        -- A Little Is Enough (Baruch et al., NeurIPS 2019): ``mean + z * std`` of the
  updates, which is the ``mean - z * std`` of the gradients in the paper (an update is -lr * grad).
* ``ipm``         -- Inner Product Manipulation (Xie et al., UAI 2020): ``-epsilon * mean``.
* ``minmax`` / ``minsum`` -- Shejwalkar & Houmansadr (NDSS 2021): ``mean + gamma * p`` of the
  updates, p = +std (the paper's -std of the gradients), -unit or -sign; gamma by the paper's
  distance constraint (``variant="agnostic"``) or by search against the server (``"tailored"``).
* ``fang_krum`` / ``fang_trmean`` -- Fang et al. (USENIX Security 2020), in ``fang.py``.
* ``mimic``       -- Karimireddy et al. (ICLR 2022), in ``mimic.py``.

"Benign statistics" are computed over the honest rows; when a round has none (h = 0), over the
attackers' own honest updates ``ctx.own``. Aggregator-aware attacks search against
``ctx.aggregator`` when the federation provides it -- the server's *whole* defense pipeline as
attackers see it (validate, clip, sign filter, reputation, ... then the aggregator and post
steps) -- and only otherwise build the single aggregator named in their parameters. A
simulation never changes a stateful stage's state (its ``state_dict`` is restored after each
run). After each call, ``attack.last`` holds what the attack chose (z, epsilon, gamma, lambda,
target) for monitoring and tests.
"""

from __future__ import annotations

import copy
import inspect
import math
from statistics import NormalDist

import torch

from .. import defenses as _defenses  # noqa: F401  (registers the aggregators simulated below)
from ..context import AttackContext, RoundContext
from ..errors import PhalanxError
from ..registry import ATTACKS, DEFENSES
from ..updates import pairwise_sq_dists
from .base import Attack
from .model_poisoning import check_choice, check_inputs, check_int, check_number


# ---- shared machinery ------------------------------------------------------------------------

def _benign(name: str, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    own = check_inputs(name, honest, ctx)
    return honest.to(torch.float32) if honest.shape[0] > 0 else own


def _std(B: torch.Tensor) -> torch.Tensor:
    """Per-coordinate standard deviation (unbiased when there are two rows or more)."""
    return B.std(0, correction=1 if B.shape[0] > 1 else 0)


def _repeat(row: torch.Tensor, m: int) -> torch.Tensor:
    return row.to(torch.float32).unsqueeze(0).expand(m, -1).clone()


def alie_z(n: int, f: int) -> float:
    """z of Baruch et al. (2019): s = floor(n/2 + 1) - f supporters needed, z = Phi^-1((n - s) / n)."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n if n > 0 else 0.0
    if not 0.0 < p < 1.0:
        raise PhalanxError(f"alie: the paper's z needs 0 < (n - s)/n < 1 with s = floor(n/2 + 1) - f, "
                           f"that is f < n/2 + 1 and n > 2; got n={n}, f={f}")
    return NormalDist().inv_cdf(p)


def _server(aggregator: str, f: int | None, ctx: AttackContext):
    """ctx.aggregator when present, else DEFENSES.build(aggregator, f=...) (f = ctx.m by default)."""
    if ctx.aggregator is not None:
        return ctx.aggregator
    factory = DEFENSES.get(aggregator)
    params = {}
    if "f" in inspect.signature(factory).parameters:
        params["f"] = ctx.m if f is None else f
    return DEFENSES.build(aggregator, **params)


class _Simulator:
    """Runs the server's aggregator on [honest; crafted], restoring its state after each run."""

    def __init__(self, agg, honest: torch.Tensor, m: int, ctx: AttackContext):
        self.agg, self.honest, self.ctx = agg, honest, ctx
        self.n = honest.shape[0] + m
        self.seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
        has_state = callable(getattr(agg, "state_dict", None))
        self.state = copy.deepcopy(agg.state_dict()) if has_state else None

    def __call__(self, crafted: torch.Tensor):
        U = torch.cat([self.honest, crafted.to(torch.float32)])
        if self.ctx.server_view is not None:  # the real server's view: root update, validation data
            rctx = self.ctx.server_view(self.n)
            rctx.generator = torch.Generator().manual_seed(self.seed)
        else:
            rctx = RoundContext(round=self.ctx.round, client_ids=[f"c{i}" for i in range(self.n)],
                                global_params=self.ctx.global_params,
                                generator=torch.Generator().manual_seed(self.seed))
        try:
            return self.agg(U, torch.ones(self.n), rctx)
        finally:
            if self.state is not None:
                self.agg.load_state_dict(copy.deepcopy(self.state))


_TIE = 1e-6  # relative: float32 aggregates of rows that a layer clipped alike differ in rounding only


def _deviation(sim: _Simulator, rows: torch.Tensor, mu: torch.Tensor) -> float:
    g, _ = sim(rows)
    return float((g.double() - mu.double()).norm())


def _farthest(sim: _Simulator, make, top: float, steps: int, mu: torch.Tensor) -> float:
    """The value in linspace(0, top, steps) whose crafted rows push the simulated aggregate
    farthest from ``mu`` (the smallest such value on ties, to within a relative 1e-6: past the
    point where a clip layer caps the rows, a larger value gains nothing)."""
    best, best_dist = 0.0, None
    for value in torch.linspace(0, top, steps, dtype=torch.float64).tolist():
        dist = _deviation(sim, make(value), mu)
        if best_dist is None or dist > best_dist * (1 + _TIE):
            best, best_dist = value, dist
    return best


class _EverySoOften:
    """Caches a searched value for ``every`` rounds (1: search each round), to amortize the search."""

    def __init__(self, every: int):
        self.every, self.value, self.at = every, None, None

    def __call__(self, round_: int, search) -> float:
        if self.value is None or not 0 <= round_ - self.at < self.every:
            self.value, self.at = search(), round_
        return self.value


def check_search(name: str, variant: str, aggregator: str, f, steps: int | None, search_every: int,
                 variants: tuple = ("paper", "optimal"), searching: str = "optimal") -> None:
    """Check the parameters every server-simulating attack shares; ``searching`` names the
    variant that simulates (its aggregator must then be a registered defense)."""
    check_choice(name, "variant", variant, variants)
    check_int(name, "search_every", search_every, minimum=1)
    if f is not None:
        check_int(name, "f", f)
    if steps is not None:
        check_int(name, "steps", steps, minimum=2)
    if not isinstance(aggregator, str):
        raise PhalanxError(f"{name}: aggregator must be a registered defense name, got {aggregator!r}")
    if variant == searching:
        DEFENSES.get(aggregator)  # unknown names fail now, listing what exists


# ---- ALIE and IPM ----------------------------------------------------------------------------

class ALIE(Attack):
    """A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019): every row is mean + z * std.

    The paper and its reference implementations perturb gradients by ``-z * std``; phalanx rows are
    updates (``-lr * gradient`` after one step), so the same attack is ``+z * std`` here. The sign
    matters: on Fashion-MNIST the other direction barely hurts the median."""

    name, omniscient = "alie", True

    def __init__(self, z, variant, aggregator, f, z_max, steps, search_every):
        self.z, self.variant, self.aggregator, self.f = z, variant, aggregator, f
        self.z_max, self.steps, self.last = z_max, steps, {}
        self.search = _EverySoOften(search_every)

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        B = _benign(self.name, honest, ctx)
        mu, sd = B.mean(0), _std(B)
        make = lambda z: _repeat(mu + z * sd, ctx.m)  # noqa: E731
        if self.z is not None:
            z = self.z
        elif self.variant == "paper":
            z = alie_z(ctx.n, ctx.m)
        else:
            z = self.search(ctx.round, lambda: _farthest(
                _Simulator(_server(self.aggregator, self.f, ctx), honest.float(), ctx.m, ctx),
                make, self.z_max, self.steps, mu))
        self.last = {"z": z}
        return make(z)

    def __repr__(self) -> str:
        return f"ALIE(z={self.z}, variant={self.variant!r})"


class IPM(Attack):
    """Inner Product Manipulation (Xie, Koyejo & Gupta, UAI 2020): every row is -epsilon * mean."""

    name, omniscient = "ipm", True

    def __init__(self, epsilon, variant, aggregator, f, eps_max, steps, search_every):
        self.epsilon, self.variant, self.aggregator, self.f = epsilon, variant, aggregator, f
        self.eps_max, self.steps, self.last = eps_max, steps, {}
        self.search = _EverySoOften(search_every)

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        B = _benign(self.name, honest, ctx)
        mu = B.mean(0)
        make = lambda e: _repeat(-e * mu, ctx.m)  # noqa: E731
        eps = self.epsilon
        if self.variant == "optimal":
            eps = self.search(ctx.round, lambda: _farthest(
                _Simulator(_server(self.aggregator, self.f, ctx), honest.float(), ctx.m, ctx),
                make, self.eps_max, self.steps, mu))
        self.last = {"epsilon": eps}
        return make(eps)

    def __repr__(self) -> str:
        return f"IPM(epsilon={self.epsilon}, variant={self.variant!r})"


@ATTACKS.register("alie")
def alie(z: float | None = None, variant: str = "paper", aggregator: str = "median",
         f: int | None = None, z_max: float = 5.0, steps: int = 26, search_every: int = 1) -> Attack:
    """ALIE: mean + z*std of the updates. z: explicit value; else variant "paper" (z from n and f,
    Baruch et al.) or "optimal" (grid search of z in [0, z_max] maximizing the simulated aggregate's deviation,
    repeated every ``search_every`` rounds)."""
    if z is not None:
        check_number("alie", "z", z)
        if variant == "optimal":
            raise PhalanxError("alie: give either z or variant='optimal', not both; got "
                               f"z={z!r}, variant='optimal'")
    check_number("alie", "z_max", z_max, positive=True)
    check_search("alie", variant, aggregator, f, steps, search_every)
    return ALIE(None if z is None else float(z), variant, aggregator, f, float(z_max), steps, search_every)


@ATTACKS.register("ipm")
def ipm(epsilon: float = 0.1, variant: str = "paper", aggregator: str = "median",
        f: int | None = None, eps_max: float = 10.0, steps: int = 41, search_every: int = 1) -> Attack:
    """IPM: -epsilon * honest mean. variant "paper" uses epsilon; "optimal" grid-searches epsilon
    in [0, eps_max] to maximize the simulated aggregate's deviation, every ``search_every`` rounds."""
    check_number("ipm", "epsilon", epsilon, positive=True)
    check_number("ipm", "eps_max", eps_max, positive=True)
    check_search("ipm", variant, aggregator, f, steps, search_every)
    return IPM(float(epsilon), variant, aggregator, f, float(eps_max), steps, search_every)


# ---- Min-Max and Min-Sum: AGR-agnostic and AGR-tailored ------------------------------------

def _halving(ok, gamma_init: float, tol: float) -> float:
    """Largest gamma with ok(gamma), by the halving search of Shejwalkar & Houmansadr (2021).

    Their search starts at gamma_init and can reach at most 2 * gamma_init; we first double
    gamma_init while 2 * gamma stays feasible, so a too-small gamma_init does not cap the result.
    """
    gamma = gamma_init
    while ok(2 * gamma) and gamma < 1e30:
        gamma *= 2
    best, step = 0.0, gamma / 2
    while step > tol:
        if ok(gamma):
            best, gamma = gamma, gamma + step
        else:
            gamma -= step
        step /= 2
    return max(best, gamma) if ok(gamma) else best


def _tailored(dev, gamma_init: float, tol: float, seeds: tuple) -> float:
    """gamma >= 0 maximizing dev(gamma), the simulated aggregate's distance from the benign mean
    (the AGR-tailored objective of Shejwalkar & Houmansadr 2021). From gamma_init, double while
    that moves the aggregate further (20 times at most: against a plain mean it always does), then
    halve a step each iteration, moving to the best of gamma - step, gamma, gamma + step. Every
    value tried competes, ``seeds`` included (0 and the agnostic gamma), so the result is never
    worse than those; among values within a relative 1e-6 of the best, the smallest wins."""
    seen: dict[float, float] = {}

    def score(g: float) -> float:
        if g not in seen:
            seen[g] = dev(g)
        return seen[g]

    for g in seeds:
        score(g)
    gamma = gamma_init
    for _ in range(20):
        if score(2 * gamma) <= score(gamma) * (1 + _TIE):
            break
        gamma *= 2
    step = gamma / 2
    while step > tol:
        gamma = max((gamma, gamma + step, max(gamma - step, 0.0)), key=score)  # ties: stay
        step /= 2
    top = max(seen.values())
    return min(g for g, v in seen.items() if v >= top / (1 + _TIE))


class DistanceAttack(Attack):
    """mean + gamma * p. Agnostic: the largest gamma keeping the crafted row's max (min-max) or
    summed (min-sum) squared distance to the benign rows within the benign rows' own max /
    max-sum. Tailored: the gamma moving the server's simulated aggregate farthest from the benign
    mean (the agnostic gamma among the candidates, so never less far than it).

    Shejwalkar & Houmansadr (and their reference code, ``our_attack_dist`` / ``our_attack_score``)
    craft ``mean - gamma * deviation`` on gradients, with deviation ``std``, ``mean/|mean|`` or
    ``sign(mean)``. phalanx rows are updates (``-lr * gradient``), so the perturbation p on updates
    is ``+std`` (a std does not change sign with the rows), ``-mean/|mean|`` and ``-sign(mean)``
    (the mean does). The same conversion as ALIE's ``mean + z * std``."""

    omniscient = True

    def __init__(self, name, perturbation, gamma_init, tol, variant="agnostic", aggregator="trimmed_mean",
                 f=None, search_every=1):
        self.name, self.perturbation, self.gamma_init, self.tol = name, perturbation, gamma_init, tol
        self.variant, self.aggregator, self.f = variant, aggregator, f
        self.search = _EverySoOften(search_every)
        self.last: dict = {}

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        B = _benign(self.name, honest, ctx).double()
        mu = B.mean(0)
        if self.perturbation == "std":  # -std on gradients is +std on updates
            p = _std(B)
        elif self.perturbation == "unit":
            p = -mu / mu.norm().clamp_min(1e-30)
        else:
            p = -torch.sign(mu)
        C = B - mu  # |b_i - (mu + g p)|^2 = a_i - 2 g c_i + g^2 q
        a, c, q = (C * C).sum(1), C @ p, float(p @ p)
        D = pairwise_sq_dists(B)
        if self.name == "minmax":
            bound = float(D.max())
            ok = lambda g: float((a - 2 * g * c + g * g * q).max()) <= bound  # noqa: E731
        else:
            bound = float(D.sum(1).max())
            ok = lambda g: float((a - 2 * g * c + g * g * q).sum()) <= bound  # noqa: E731
        gamma = _halving(ok, self.gamma_init, self.tol) if q > 0 else 0.0
        self.last = {"gamma": gamma, "bound": bound}
        make = lambda g: _repeat(mu + g * p, ctx.m)  # noqa: E731
        if self.variant == "tailored" and q > 0:
            agnostic = gamma

            def search() -> float:
                sim = _Simulator(_server(self.aggregator, self.f, ctx), honest.float(), ctx.m, ctx)
                return _tailored(lambda g: _deviation(sim, make(g), mu), self.gamma_init, self.tol,
                                 (0.0, agnostic))

            gamma = self.search(ctx.round, search)
            self.last.update(gamma=gamma, agnostic_gamma=agnostic)
        return make(gamma)

    def __repr__(self) -> str:
        return f"DistanceAttack({self.name!r}, perturbation={self.perturbation!r}, variant={self.variant!r})"


def _distance_attack(name, perturbation, gamma_init, tol, variant, aggregator, f, search_every) -> Attack:
    check_choice(name, "perturbation", perturbation, ("std", "unit", "sign"))
    check_number(name, "gamma_init", gamma_init, positive=True)
    check_number(name, "tol", tol, positive=True)
    check_search(name, variant, aggregator, f, None, search_every, ("agnostic", "tailored"), "tailored")
    return DistanceAttack(name, perturbation, float(gamma_init), float(tol), variant, aggregator, f, search_every)


@ATTACKS.register("minmax")
def minmax(perturbation: str = "std", gamma_init: float = 10.0, tol: float = 1e-5, variant: str = "agnostic",
           aggregator: str = "trimmed_mean", f: int | None = None, search_every: int = 1) -> Attack:
    """Min-Max (Shejwalkar & Houmansadr 2021): max distance to benign rows <= benign max distance.
    perturbation, on updates: "std" (+std), "unit" (-mean/|mean|) or "sign" (-sign(mean)); that is
    the paper's -std, -unit and -sign on gradients. variant "tailored": gamma searched against the
    server (ctx.aggregator, else the named aggregator) to move its aggregate farthest."""
    return _distance_attack("minmax", perturbation, gamma_init, tol, variant, aggregator, f, search_every)


@ATTACKS.register("minsum")
def minsum(perturbation: str = "std", gamma_init: float = 10.0, tol: float = 1e-5, variant: str = "agnostic",
           aggregator: str = "trimmed_mean", f: int | None = None, search_every: int = 1) -> Attack:
    """Min-Sum (Shejwalkar & Houmansadr 2021): summed squared distance <= benign max sum.
    perturbation and variant as for :func:`minmax` (on updates: +std, -mean/|mean|, -sign(mean))."""
    return _distance_attack("minsum", perturbation, gamma_init, tol, variant, aggregator, f, search_every)
