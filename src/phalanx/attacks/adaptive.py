"""Omniscient model-poisoning attacks: they read the honest rows, and some simulate the server.

* ``alie``        -- A Little Is Enough (Baruch et al., NeurIPS 2019): ``mean + z * std`` of the
  updates, which is the ``mean - z * std`` of the gradients in the paper (an update is -lr * grad).
* ``ipm``         -- Inner Product Manipulation (Xie et al., UAI 2020): ``-epsilon * mean``.
* ``minmax`` / ``minsum`` -- the AGR-agnostic attacks of Shejwalkar & Houmansadr (NDSS 2021):
  ``mean + gamma * p`` of the updates, p = +std (the paper's -std of the gradients), -unit or -sign.
* ``fang_krum`` / ``fang_trmean`` -- Fang et al. (USENIX Security 2020), full knowledge.
* ``mimic``       -- Karimireddy et al. (ICLR 2022), in ``mimic.py``: every attacker copies one
  honest client.

"Benign statistics" are computed over the honest rows; when a round has none (h = 0), over the
attackers' own honest updates ``ctx.own``. Aggregator-aware attacks run ``ctx.aggregator`` when
the federation provides it, else build the aggregator named in their parameters; the simulation
never changes a stateful aggregator's state. After each call, ``attack.last`` holds what the
attack chose (z, epsilon, gamma, lambda, target) for monitoring and tests.
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


def _farthest(sim: _Simulator, make, top: float, steps: int, mu: torch.Tensor) -> float:
    """The value in linspace(0, top, steps) whose crafted rows push the simulated aggregate
    farthest from ``mu`` (the first such value on ties)."""
    best, best_dist = 0.0, -1.0
    for value in torch.linspace(0, top, steps, dtype=torch.float64).tolist():
        g, _ = sim(make(value))
        dist = float((g.double() - mu.double()).norm())
        if dist > best_dist:
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


def _check_search(name: str, variant: str, aggregator: str, f, steps: int, search_every: int) -> None:
    check_choice(name, "variant", variant, ("paper", "optimal"))
    check_int(name, "search_every", search_every, minimum=1)
    if f is not None:
        check_int(name, "f", f)
    check_int(name, "steps", steps, minimum=2)
    if not isinstance(aggregator, str):
        raise PhalanxError(f"{name}: aggregator must be a registered defense name, got {aggregator!r}")
    if variant == "optimal":
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
    _check_search("alie", variant, aggregator, f, steps, search_every)
    return ALIE(None if z is None else float(z), variant, aggregator, f, float(z_max), steps, search_every)


@ATTACKS.register("ipm")
def ipm(epsilon: float = 0.1, variant: str = "paper", aggregator: str = "median",
        f: int | None = None, eps_max: float = 10.0, steps: int = 41, search_every: int = 1) -> Attack:
    """IPM: -epsilon * honest mean. variant "paper" uses epsilon; "optimal" grid-searches epsilon
    in [0, eps_max] to maximize the simulated aggregate's deviation, every ``search_every`` rounds."""
    check_number("ipm", "epsilon", epsilon, positive=True)
    check_number("ipm", "eps_max", eps_max, positive=True)
    _check_search("ipm", variant, aggregator, f, steps, search_every)
    return IPM(float(epsilon), variant, aggregator, f, float(eps_max), steps, search_every)


# ---- Min-Max and Min-Sum (AGR-agnostic) ------------------------------------------------------

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


class DistanceAttack(Attack):
    """mean + gamma * p, with the largest gamma keeping the crafted row's max (min-max) or summed
    (min-sum) squared distance to the benign rows within the benign rows' own max / max-sum.

    Shejwalkar & Houmansadr (and their reference code, ``our_attack_dist`` / ``our_attack_score``)
    craft ``mean - gamma * deviation`` on gradients, with deviation ``std``, ``mean/|mean|`` or
    ``sign(mean)``. phalanx rows are updates (``-lr * gradient``), so the perturbation p on updates
    is ``+std`` (a std does not change sign with the rows), ``-mean/|mean|`` and ``-sign(mean)``
    (the mean does). The same conversion as ALIE's ``mean + z * std``."""

    omniscient = True

    def __init__(self, name, perturbation, gamma_init, tol):
        self.name, self.perturbation, self.gamma_init, self.tol = name, perturbation, gamma_init, tol
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
        return _repeat(mu + gamma * p, ctx.m)

    def __repr__(self) -> str:
        return f"DistanceAttack({self.name!r}, perturbation={self.perturbation!r})"


def _distance_attack(name, perturbation, gamma_init, tol) -> Attack:
    check_choice(name, "perturbation", perturbation, ("std", "unit", "sign"))
    check_number(name, "gamma_init", gamma_init, positive=True)
    check_number(name, "tol", tol, positive=True)
    return DistanceAttack(name, perturbation, float(gamma_init), float(tol))


@ATTACKS.register("minmax")
def minmax(perturbation: str = "std", gamma_init: float = 10.0, tol: float = 1e-5) -> Attack:
    """Min-Max (Shejwalkar & Houmansadr 2021): max distance to benign rows <= benign max distance.
    perturbation, on updates: "std" (+std), "unit" (-mean/|mean|) or "sign" (-sign(mean)); that is
    the paper's -std, -unit and -sign on gradients."""
    return _distance_attack("minmax", perturbation, gamma_init, tol)


@ATTACKS.register("minsum")
def minsum(perturbation: str = "std", gamma_init: float = 10.0, tol: float = 1e-5) -> Attack:
    """Min-Sum (Shejwalkar & Houmansadr 2021): summed squared distance <= benign max sum.
    perturbation as for :func:`minmax` (on updates: +std, -mean/|mean|, -sign(mean))."""
    return _distance_attack("minsum", perturbation, gamma_init, tol)


# ---- Fang et al. (2020) ------------------------------------------------------------------------

class FangKrum(Attack):
    """Fang et al. 2020, attack on Krum: rows -lambda * s, s = sign(honest mean); lambda starts at
    the paper's upper bound and halves until the server selects a crafted row or lambda < threshold.
    Rows 2..m lie within ``eps`` of the first (eps = 0: identical copies)."""

    name, omniscient = "fang_krum", True

    def __init__(self, aggregator, f, threshold, eps):
        self.aggregator, self.f, self.threshold, self.eps = aggregator, f, threshold, eps
        self.last: dict = {}

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        B = _benign(self.name, honest, ctx)
        h, m, d = honest.shape[0], ctx.m, B.shape[1]
        n = h + m
        if m == 0:
            return torch.zeros(0, d)
        if n - 2 * m - 1 < 1 or h < 2:
            raise PhalanxError(f"fang_krum: needs n > 2f + 1 clients and 2 honest rows, got n={n}, f={m}")
        s = torch.sign(B.mean(0))
        dist = pairwise_sq_dists(B).sqrt()
        k = min(n - m - 2, h - 1)
        near = dist.sort(1).values[:, 1:k + 1].sum(1)  # column 0 is the row itself
        lam = float(near.min()) / ((n - 2 * m - 1) * math.sqrt(d)) + float(B.norm(dim=1).max()) / math.sqrt(d)
        offsets = torch.randn(m, d, generator=ctx.generator)
        radius = self.eps * torch.rand(m, 1, generator=ctx.generator)
        offsets *= radius / offsets.norm(dim=1, keepdim=True).clamp_min(1e-30)
        offsets[0] = 0
        sim = _Simulator(_server(self.aggregator, self.f, ctx), honest.float(), m, ctx)
        while True:
            crafted = -lam * s + offsets
            g, rep = sim(crafted)
            picked = _picks_crafted(rep, g, torch.cat([honest.float(), crafted]), h)
            if picked or lam / 2 < self.threshold:
                break
            lam /= 2
        self.last = {"lambda": lam, "selected": picked}
        return crafted.to(torch.float32)

    def __repr__(self) -> str:
        return f"FangKrum(aggregator={self.aggregator!r}, eps={self.eps})"


def _picks_crafted(rep, g: torch.Tensor, U: torch.Tensor, h: int) -> bool:
    """Did the server select a crafted row (index >= h)? Uses report.selected when it is
    informative; otherwise asks whether the row nearest the aggregate is a crafted one."""
    sel = getattr(rep, "selected", None)
    if sel is not None and sel.numel() == U.shape[0] and not bool(sel.all()):
        return bool(sel[h:].any())
    return int(((U.double() - g.double()) ** 2).sum(1).argmin()) >= h


class FangTrmean(Attack):
    """Fang et al. 2020, attack on trimmed mean / median (full knowledge). With s_j the sign of the
    honest mean, a coordinate that would rise (s_j > 0) gets values below the honest minimum, one
    that would fall gets values above the honest maximum; each value is drawn uniformly from the
    paper's interval between that extreme e and e*b or e/b (whichever lies further out)."""

    name, omniscient = "fang_trmean", True

    def __init__(self, b):
        self.b = b

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        B = _benign(self.name, honest, ctx)
        down = B.mean(0) >= 0  # push against the estimated change direction
        e = torch.where(down, B.min(0).values, B.max(0).values)
        far = torch.where((e > 0) == down, e / self.b, e * self.b)
        u = torch.rand(ctx.m, B.shape[1], generator=ctx.generator)
        return (e + u * (far - e)).to(torch.float32)

    def __repr__(self) -> str:
        return f"FangTrmean(b={self.b})"


@ATTACKS.register("fang_krum")
def fang_krum(aggregator: str = "krum", f: int | None = None, threshold: float = 1e-5,
              eps: float = 0.0) -> Attack:
    """Fang et al. (2020) attack on Krum; the server simulated with DEFENSES.build(aggregator, f)."""
    if not isinstance(aggregator, str):
        raise PhalanxError(f"fang_krum: aggregator must be a registered defense name, got {aggregator!r}")
    if f is not None:
        check_int("fang_krum", "f", f)
    check_number("fang_krum", "threshold", threshold, positive=True)
    check_number("fang_krum", "eps", eps, nonneg=True)
    DEFENSES.get(aggregator)  # unknown names fail now, listing what exists
    return FangKrum(aggregator, f, float(threshold), float(eps))


@ATTACKS.register("fang_trmean")
def fang_trmean(b: float = 2.0) -> Attack:
    """Fang et al. (2020) attack on trimmed mean and median; b > 1 bounds how far out values go."""
    check_number("fang_trmean", "b", b, positive=True)
    if b <= 1:
        raise PhalanxError(f"fang_trmean: b must be a number > 1, got {b!r}")
    return FangTrmean(float(b))
