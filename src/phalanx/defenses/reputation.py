"""Time-decay reputation per client id, with quarantine and recovery.

Each round a client that sent an update earns a contribution c in [0, 1]:

* agreement: its cosine with the round's robust aggregate, relative to the round's median
  cosine (clamped to [0, 1]), so honest clients in a non-IID round still score near 1;
* norm: 1 while its robust norm z-score is within ``z_tolerance``, decaying beyond;
* validation (when the server holds data, ``ctx.val_loss``): 1 when applying the update alone
  does not raise the validation loss more than applying the aggregate, decaying otherwise.

c is the product of the available terms (0 for a row an earlier layer rejected), and
``r <- decay * r + (1 - decay) * c``. Unknown clients start at ``prior``. A client whose
reputation falls under ``threshold`` is quarantined (weight 0) until it climbs back over
``release`` (hysteresis), which takes several rounds of good behaviour. Given ``f`` (the server's
assumed Byzantine count; a pipeline passes it), at most f clients are quarantined at a time, the
lowest-scored, counting the rows earlier layers dropped that round: quarantining more would
contradict the assumption and could leave the aggregator too few rows for its bound (a non-IID
round can make honest clients look poor). With f > 0 the layer needs n > 2f active rows (w > 0)
when it is called (``BoundError``): its agreement term is relative to the round's median cosine,
which belongs to an honest client only under an honest majority, the same bound as the
coordinate-wise median (Yin et al. 2018); this reputation rule is our own, no paper sets another.
Rows earlier layers rejected do not lower f in that check (see ``robust``). In the pipeline the
layer weights rows by reputation before aggregation and learns from the aggregate after it, so it
may be listed before or after the aggregator.
"""

from __future__ import annotations

from typing import Any

import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from .base import Layer, Report, require_rows
from .validate import robust_z


class Reputation(Layer):
    name = "reputation"
    anywhere = True  # may be listed after the aggregator in a config

    def __init__(self, decay: float = 0.7, prior: float = 0.6, threshold: float = 0.3, release: float = 0.5,
                 z_tolerance: float = 3.0, use_validation: bool = True, weight_by_reputation: bool = True,
                 f: int | None = None):
        for pname, v in (("decay", decay), ("prior", prior), ("threshold", threshold), ("release", release)):
            if not 0 <= v <= 1:
                raise PhalanxError(f"reputation: {pname} must be in [0, 1], got {v}")
        if release < threshold:
            raise PhalanxError(f"reputation: release must be >= threshold ({threshold}), got {release}")
        if not z_tolerance > 0:
            raise PhalanxError(f"reputation: z_tolerance must be > 0, got {z_tolerance}")
        self.decay, self.prior, self.threshold, self.release = decay, prior, threshold, release
        self.z_tolerance = z_tolerance
        self.use_validation = use_validation
        self.weight_by_reputation = weight_by_reputation
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
            raise PhalanxError(f"reputation: f must be an integer >= 0 or None, got {f!r}")
        self.f = f
        self.scores: dict[str, float] = {}
        self.quarantined: set[str] = set()
        self.history: dict[str, list[float]] = {}

    def score(self, cid: str) -> float:
        return self.scores.get(cid, self.prior)

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        if self.f:
            require_rows(self.name, int((w > 0).sum()), 2 * self.f + 1, "n > 2f", self.f)
        report = Report(self.name, n=U.shape[0])
        r = torch.tensor([self.score(c) for c in ctx.client_ids], dtype=torch.float64)
        w = w.clone()
        held = [i for i, cid in enumerate(ctx.client_ids) if cid in self.quarantined]
        if self.f is not None:  # with the rows earlier layers dropped, at most f leave the round
            dropped = w <= 0
            dropped[held] = False
            room = max(0, self.f - int(dropped.sum()))
            held = sorted(held, key=lambda i: (self.score(ctx.client_ids[i]), i))[:room]
        for i in held:
            w[i] = 0.0
            report.reject(i, "quarantined")
        if self.weight_by_reputation:
            w = w * r.to(w.dtype)
        report.scores = r
        report.selected = w > 0
        report.info["quarantined"] = sorted(self.quarantined)
        return U, w, report

    def contributions(self, U: torch.Tensor, w: torch.Tensor, g: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        n = U.shape[0]
        ok = torch.isfinite(U).all(1)
        c = torch.zeros(n, dtype=torch.float64)
        if not bool(ok.any()):
            return c
        A = U[ok].double()
        g64 = g.double()
        cos = (A @ g64) / (A.norm(dim=1) * g64.norm()).clamp_min(1e-12)
        ref = float(cos.median())
        agree = (cos / ref).clamp(0, 1) if ref > 1e-6 else (cos > 0).double()
        z = robust_z(A.norm(dim=1)).abs() if len(A) >= 4 else torch.zeros(len(A), dtype=torch.float64)
        norm_term = torch.exp(-(z - self.z_tolerance).clamp_min(0))
        term = agree * norm_term
        if self.use_validation and ctx.val_loss is not None:
            base = ctx.val_loss(ctx.global_params + g)
            own = torch.tensor([ctx.val_loss(ctx.global_params + u.float()) for u in U[ok]], dtype=torch.float64)
            term = term * torch.exp(-((own - base) / max(abs(base), 1e-6)).clamp_min(0))
        c[ok] = term
        return c

    def observe(self, U: torch.Tensor, w: torch.Tensor, g: torch.Tensor, ctx: RoundContext, rejected: torch.Tensor) -> None:
        """Learn from this round: U and w as this layer received them, g the final aggregate."""
        c = self.contributions(U, w, g, ctx)
        c[rejected] = 0.0
        for i, cid in enumerate(ctx.client_ids):
            r = self.decay * self.score(cid) + (1 - self.decay) * float(c[i])
            self.scores[cid] = r
            self.history.setdefault(cid, []).append(r)
            if r < self.threshold:
                self.quarantined.add(cid)
            elif r >= self.release:
                self.quarantined.discard(cid)
        if self.f is not None and len(self.quarantined) > self.f:  # keep the f lowest-scored
            self.quarantined = set(sorted(self.quarantined, key=lambda c: (self.scores[c], c))[:self.f])

    def state_dict(self) -> dict[str, Any]:
        """Everything the layer learns (copies, JSON-friendly): each client's reputation, who is
        quarantined, and each client's reputation after every round it took part in. The rest
        (decay, thresholds, f) is configuration. A layer built afresh with the same parameters and
        given this state continues exactly as the saved one would have."""
        return {"scores": dict(self.scores), "quarantined": sorted(self.quarantined),
                "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return  # a fresh pipeline slot: nothing learnt yet
        keys = {"scores", "quarantined", "history"}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise PhalanxError(f"reputation: state keys must be {sorted(keys)}, got {got}")
        try:
            scores = {c: float(r) for c, r in dict(state["scores"]).items()}
        except (TypeError, ValueError):
            raise PhalanxError("reputation: state scores must map client id -> number, got "
                               f"{state['scores']!r:.80}") from None
        quarantined = state["quarantined"]
        try:
            ok = not isinstance(quarantined, (str, bytes)) and all(c in scores for c in quarantined)
        except TypeError:
            ok = False
        if not ok:
            raise PhalanxError("reputation: state quarantined must list client ids that have a score, "
                               f"got {quarantined!r:.80}")
        try:
            history = {c: [float(r) for r in v] for c, v in dict(state["history"]).items()}
        except (TypeError, ValueError):
            raise PhalanxError("reputation: state history must map client id -> list of numbers, got "
                               f"{state['history']!r:.80}") from None
        self.scores, self.quarantined, self.history = scores, set(quarantined), history


@DEFENSES.register("reputation")
def reputation(decay: float = 0.7, prior: float = 0.6, threshold: float = 0.3, release: float = 0.5,
               z_tolerance: float = 3.0, use_validation: bool = True, weight_by_reputation: bool = True,
               f: int | None = None) -> Reputation:
    """Time-decay reputation (cosine agreement, norm z-score, validation loss) with quarantine of at
    most f clients."""
    return Reputation(decay, prior, threshold, release, z_tolerance, use_validation, weight_by_reputation, f)
