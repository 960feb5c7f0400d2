"""Attacks aimed at layered defenses: reputation with quarantine, and row-statistics filters.

* ``on_off``  -- honest for a warm-up, then attack bursts separated by honest spells, so a
  time-decay reputation never falls to the quarantine threshold (or recovers before it matters).
* ``stealth`` -- one row whose L2 norm, sign statistics and cosine similarities sit inside the
  honest rows' range, turned as far against the benign direction as those statistics allow.

Both read ``ctx.round`` and keep what they need across rounds in ``ctx.history`` (checkpointed
with the run). ``stealth`` checks candidate rows against the server as well when it can simulate
it (``ctx.aggregator``, the whole pipeline as attackers see it; state restored after each run).
"""

from __future__ import annotations

import torch

from ..context import AttackContext
from ..errors import PhalanxError
from ..registry import ATTACKS, DEFENSES
from .adaptive import _benign, _deviation, _server, _Simulator
from .base import Attack, TrainingHook, TrainingInfo
from .model_poisoning import check_choice, check_inputs, check_int, check_number


# ---- on-off ------------------------------------------------------------------------------------

class OnOff(Attack):
    """On-off attack, against time-decay reputation with quarantine.

    Threat model: clients that know the server keeps a decaying reputation (plus what the inner attack knows).

    They behave honestly until their reputation is believed high, then attack in short bursts,
    each followed by honest rounds in which a time-decay reputation recovers (quarantine below a
    threshold, release above another, never reached).

    The attackers' clock starts at the first round the attack runs (``history["on_off_start"]``):
    ``honest_rounds`` of warm-up, then repeating cycles of ``on`` attack rounds and ``off``
    honest rounds. Honest rounds send the attackers' own updates ``ctx.own`` unchanged; attack
    rounds send what the inner attack crafts (and use its training hook, if it has one).
    ``last["phase"]``: "warmup", "on" or "off"."""

    name = "on_off"

    def __init__(self, honest_rounds: int, on: int, off: int, inner: Attack):
        self.honest_rounds, self.on, self.off, self.inner = honest_rounds, on, off, inner
        self.omniscient = inner.omniscient
        self.last: dict = {}

    def phase(self, round_: int, history: dict) -> str:
        t = int(round_) - int(history.setdefault("on_off_start", int(round_)))
        if t < self.honest_rounds:
            return "warmup"
        return "on" if (t - self.honest_rounds) % (self.on + self.off) < self.on else "off"

    def training_hook(self, info: TrainingInfo) -> TrainingHook | None:
        return self.inner.training_hook(info) if self.phase(info.round, info.history) == "on" else None

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        own = check_inputs(self.name, honest, ctx)
        phase = self.phase(ctx.round, ctx.history)
        if phase != "on":
            self.last = {"phase": phase}
            return own.clone()
        rows = self.inner(honest, ctx)
        self.last = {"phase": phase, **getattr(self.inner, "last", {})}
        return rows

    def __repr__(self) -> str:
        return f"OnOff(honest_rounds={self.honest_rounds}, on={self.on}, off={self.off}, inner={self.inner!r})"


@ATTACKS.register("on_off")
def on_off(honest_rounds: int = 5, on: int = 2, off: int = 3, attack: str = "sign_flip",
           params: dict | None = None) -> Attack:
    """On-off: honest warm-up, then bursts of the inner attack between honest spells (vs reputation).
    honest_rounds of warm-up, then cycles of `on` rounds of `attack` (built with `params`) and
    `off` honest rounds."""
    check_int("on_off", "honest_rounds", honest_rounds)
    check_int("on_off", "on", on, minimum=1)
    check_int("on_off", "off", off)
    if not isinstance(attack, str):
        raise PhalanxError(f"on_off: attack must be a registered attack name, got {attack!r}")
    if params is not None and not isinstance(params, dict):
        raise PhalanxError(f"on_off: params must be a mapping of the inner attack's parameters, got {params!r}")
    try:
        inner = ATTACKS.build(attack, **(params or {}))
    except PhalanxError as e:
        raise PhalanxError(f"on_off: attack {attack!r} could not be built ({e}); got params={params!r}") from None
    if not isinstance(inner, Attack):
        raise PhalanxError(f"on_off: attack must build a model-poisoning Attack, got {type(inner).__name__}")
    return OnOff(honest_rounds, on, off, inner)


# ---- stealth -----------------------------------------------------------------------------------

STATS = ("norm", "positive", "negative", "zero", "cosine_to_mean", "mean_pairwise_cosine")


class RowStats:
    """The statistics of :data:`STATS` against fixed benign rows B [h, d] (float64 [k, 6] per call):
    per row its L2 norm; fractions of positive, negative and zero entries; cosine with the mean of
    B; mean cosine with the rows of B. ``honest()`` gives them for the rows of B themselves, each
    cosine leaving the row out (the mean of the *other* rows, the other rows), so that an honest
    row is described as a new row from the same distribution would be: with a noisy mean, a
    row's own share of it inflates its cosine with the mean far above what any other row reaches
    (twice over in the synthetic tests)."""

    def __init__(self, B: torch.Tensor):
        self.B = B.double()
        self.h = self.B.shape[0]
        self.mean = self.B.mean(0)
        self.units = self.B / self.B.norm(dim=1).clamp_min(1e-30)[:, None]

    @staticmethod
    def _table(R, norms, cos_mu, pair) -> torch.Tensor:
        frac = lambda mask: mask.double().mean(1)  # noqa: E731
        return torch.stack([norms, frac(R > 0), frac(R < 0), frac(R == 0), cos_mu, pair], 1)

    def honest(self) -> torch.Tensor:
        norms = self.B.norm(dim=1)
        others = (self.B.sum(0) - self.B) / max(self.h - 1, 1)
        cos_mu = (self.units * others).sum(1) / others.norm(dim=1).clamp_min(1e-30)
        C = self.units @ self.units.T
        pair = (C.sum(1) - C.diagonal()) / max(self.h - 1, 1)
        return self._table(self.B, norms, cos_mu, pair)

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        R64 = R.double()
        norms = R64.norm(dim=1)
        unit = R64 / norms.clamp_min(1e-30)[:, None]
        cos_mu = unit @ self.mean / self.mean.norm().clamp_min(1e-30)
        return self._table(R, norms, cos_mu, (unit @ self.units.T).mean(1))


def row_stats(R: torch.Tensor, B: torch.Tensor, honest: bool = False) -> torch.Tensor:
    """:class:`RowStats` of the rows R against benign rows B (``honest``: R is B, rows left out)."""
    stats = RowStats(B)
    return stats.honest() if honest else stats(R)


def _extreme(v: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Bool mask of the k largest (smallest) entries of v, as the first (last) k of a stable
    descending sort: ties go to the lower (higher) index. O(d), by kthvalue."""
    d = v.numel()
    mask = torch.zeros(d, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= d:
        return ~mask
    x = -v if largest else v
    threshold = torch.kthvalue(x, k).values
    mask = x < threshold
    ties = (x == threshold).nonzero().flatten()
    mask[(ties if largest else ties.flip(0))[:k - int(mask.sum())]] = True
    return mask


def signs_like(v: torch.Tensor, n_pos: int, n_neg: int) -> torch.Tensor:
    """v changed as little as possible (entry by entry) to have exactly n_pos positive and n_neg
    negative entries, the rest zero: ranked by value, the n_pos largest stay positive (a small
    positive value where v is not), the n_neg smallest stay negative, the ones between become 0."""
    tiny = 1e-3 * float(v.abs().mean().clamp_min(1e-30))
    top, bottom = _extreme(v, n_pos, True), _extreme(v, n_neg, False)
    out = torch.zeros_like(v)
    out[top] = v[top].clamp_min(tiny)
    out[bottom] = v[bottom].clamp_max(-tiny)
    return out


class Stealth(Attack):
    """Stealth attack, against filters on row statistics (validate, clip, sign_filter, FLAME-style).

    Threat model: omniscient clients (read honest rows, may simulate the server) facing per-row statistic filters.

    They send rows that look like honest ones on every statistic such filters compare (L2 norm,
    fractions of positive, negative and zero entries, cosine with the mean and with the other
    rows) while pulling the aggregate against the benign direction.

    With mu the benign mean and p the perturbation (``sign``: -sign(mu), the step that undoes
    progress coordinate by coordinate; ``std``: +std, ALIE's direction on updates), candidate rows
    follow the path ``u(t) = unit((1 - t) mu/|mu| + t p/|p|)``, t in [0, 1], whose cosine with mu
    falls from 1 as t grows. Each candidate gets the median honest row's numbers of positive and
    zero entries (:func:`signs_like`: ranked by value, the top entries positive, the bottom ones
    negative, those between zero, each changed as little as possible) and a norm in the honest band
    (``norm``: "auto" = the band's low end while its cosine with mu is positive, its high end once
    negative, so its component along mu is as small as the band allows). A candidate *passes* when
    its six statistics (:data:`STATS`) lie in the honest rows' [q, 1 - q] quantile band
    (q = ``band``) and, when the server can be simulated, no stage discards a crafted row. The
    attack sends the candidate with the largest passing t (a grid of ``grid`` points over the
    stretch of the path where the cosine with mu is in band, scanned from its far end, then
    ``steps`` bisection steps toward the next grid point), every attacker the same
    row; when none passes, the benign row with the smallest inner product with mu."""

    name, omniscient = "stealth", True

    def __init__(self, perturbation, band, norm, grid, steps, aggregator, f):
        self.perturbation, self.band, self.norm = perturbation, band, norm
        self.grid, self.steps, self.aggregator, self.f = grid, steps, aggregator, f
        self.last: dict = {}

    def __call__(self, honest: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        B = _benign(self.name, honest, ctx).double()
        m, d = ctx.m, B.shape[1]
        mu = B.mean(0)
        stats = RowStats(B)
        S = stats.honest()
        lo = torch.quantile(S, self.band, dim=0)
        hi = torch.quantile(S, 1 - self.band, dim=0)
        slack = 1e-9 * torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
        n_lo, n_hi, n_med = float(lo[0]), float(hi[0]), float(S[:, 0].median())
        inside = 1e-3 * (n_hi - n_lo)  # keeps float32 rounding from leaving the norm band
        n_zero = int(round(float(S[:, 3].median()) * d))
        n_pos = min(int(round(float(S[:, 1].median()) * d)), d - n_zero)
        n_neg = d - n_zero - n_pos
        mu_hat = mu / mu.norm().clamp_min(1e-30)
        p = -torch.sign(mu) if self.perturbation == "sign" else B.std(0, correction=1 if len(B) > 1 else 0)
        p_hat = p / p.norm().clamp_min(1e-30)
        sim = None
        if ctx.aggregator is not None or self.aggregator is not None:
            sim = _Simulator(_server(self.aggregator, self.f, ctx), honest.float(), m, ctx)

        cache: dict[float, torch.Tensor] = {}

        def row(t: float) -> torch.Tensor:
            if t not in cache:
                cache[t] = candidate(t)
            return cache[t]

        def candidate(t: float) -> torch.Tensor:
            u = signs_like((1 - t) * mu_hat + t * p_hat, n_pos, n_neg)
            u = u / u.norm().clamp_min(1e-30)
            cos = float(u @ mu_hat)
            if self.norm == "median":
                target = n_med
            elif self.norm == "low" or (self.norm == "auto" and cos >= 0):
                target = n_lo + inside
            else:
                target = n_hi - inside
            return (u * target).to(torch.float32)

        def in_band(r: torch.Tensor) -> bool:
            s = stats(r[None])[0]
            return bool(((s >= lo - slack) & (s <= hi + slack)).all())

        def passes(t: float) -> bool:
            r = row(t)
            if not in_band(r):
                return False
            if sim is None:
                return True
            _, rep = sim(r.expand(m, d))
            return not bool(rep.discarded()[honest.shape[0]:].any())

        def cos_of(t: float) -> float:
            r = row(t).double()
            return float(r @ mu_hat) / max(float(r.norm()), 1e-30)

        def boundary(c: float, above: bool) -> float:
            """Where the falling cosine crosses c: the last t with cosine >= c (above), else the
            first t with cosine <= c."""
            if cos_of(1.0) >= c:
                return 1.0
            if cos_of(0.0) <= c:
                return 0.0
            a, b = 0.0, 1.0
            for _ in range(24):  # t to 6e-8; the grid and the bisection below refine
                mid = (a + b) / 2
                a, b = (mid, b) if cos_of(mid) >= c else (a, mid)
            return a if above else b

        a, b = boundary(float(hi[4]), above=False), boundary(float(lo[4]), above=True)
        ts = torch.linspace(a, max(a, b), self.grid, dtype=torch.float64).tolist()
        found = next((k for k in range(len(ts) - 1, -1, -1) if passes(ts[k])), None)
        if found is None:
            worst = B[(B @ mu).argmin()]
            self.last = {"t": None, "fallback": True}
            return worst.to(torch.float32).expand(m, d).clone()
        t = ts[found]
        if found < len(ts) - 1:
            good, bad = t, ts[found + 1]
            for _ in range(self.steps):
                mid = (good + bad) / 2
                good, bad = (mid, bad) if passes(mid) else (good, mid)
            t = good
        r = row(t)
        self.last = {"t": t, "fallback": False, "cosine": float(stats(r[None])[0, 4])}
        if sim is not None:
            self.last["deviation"] = _deviation(sim, r.expand(m, d), mu)
        return r.expand(m, d).clone()

    def __repr__(self) -> str:
        return f"Stealth(perturbation={self.perturbation!r}, band={self.band}, norm={self.norm!r})"


@ATTACKS.register("stealth")
def stealth(perturbation: str = "sign", band: float = 0.1, norm: str = "auto", grid: int = 9, steps: int = 12,
            aggregator: str | None = None, f: int | None = None) -> Attack:
    """Stealth: honest-looking norm, sign fractions and cosines, turned against the benign direction.
    Aimed at validate, clip, sign_filter and FLAME-style filters; see :class:`Stealth`."""
    check_choice("stealth", "perturbation", perturbation, ("sign", "std"))
    check_number("stealth", "band", band, nonneg=True)
    if band >= 0.5:
        raise PhalanxError(f"stealth: band must be a quantile in [0, 0.5), got {band!r}")
    check_choice("stealth", "norm", norm, ("auto", "low", "median", "high"))
    check_int("stealth", "grid", grid, minimum=2)
    check_int("stealth", "steps", steps)
    if f is not None:
        check_int("stealth", "f", f)
    if aggregator is not None:
        if not isinstance(aggregator, str):
            raise PhalanxError(f"stealth: aggregator must be a registered defense name or None, got {aggregator!r}")
        DEFENSES.get(aggregator)
    return Stealth(perturbation, float(band), norm, grid, steps, aggregator, f)
