"""Time-decay reputation per client id, with quarantine and recovery, tolerant of label skew.

Each round a client that sent an update earns a contribution c in [0, 1], the product of:

* agreement, judged by direction only: with ratio = cos(u, g) / (the round's median cosine),
  g the round's aggregate (or, when the median cosine with g is not positive, as with a plain
  mean pulled over by attackers, the coordinate-wise median of the judged rows),
  c_agree = clamp((ratio + a) / (2a), 0, 1) with a = ``agreement``. A row pointing at least a
  fraction a of the typical honest alignment towards the aggregate earns full credit, a row
  pointing as far away earns none, an orthogonal row earns half. Closeness to the median earns
  nothing extra, so an honest client whose labels are skewed (its cosine is persistently low but
  positive: on Fashion-MNIST with Dirichlet(0.5) the most skewed clients sit at 0.3x the median,
  and dip below zero in 10-30% of rounds) keeps a high reputation, while a sign-flipper (below
  -0.5x the median in ~90% of rounds) loses it in two rounds. A robust z-score on cosines
  (median/MAD) was measured and rejected: honest skewed clients reach z = -7.7 in clean runs
  while still pointing the right way, because the honest spread early in training is narrow;
* norm: 1 while the row's norm is within ``z_tolerance`` robust z-scores *above* the round's
  median norm (MAD, with a floor of 10% of the median so that rows clipped to a common bound do
  not make every other row an outlier), decaying as exp(-(z - z_tolerance)) beyond;
* validation (when the server holds data, ``ctx.val_loss`` and ``use_validation``): the same
  one-sided robust z-test on the validation loss of applying the row alone, against its peers.
  A skewed honest update raises the loss when applied alone; only a clear outlier is penalised.

The reputation is a Beta reputation with forgetting (Josang and Ismail 2002, "The Beta
reputation system"): each client holds evidence of good (alpha) and bad (beta) behaviour; a round
in which it takes part adds c to alpha and 1 - c to beta after discounting both by ``decay``, and
its reputation is alpha / (alpha + beta). An unknown client starts at ``prior`` with the weight of
``prior_weight`` rounds. So a client is judged against its own record: a new client is judged
quickly (two rounds of a sign-flipper take it from 0.6 to 0.28), an established one by its long
record, so that an honest client's occasional bad rounds under label skew do not move it far,
and an attacker's occasional good rounds do not buy it back. Its evidence is bounded by
1 / (1 - decay) rounds' worth, so old behaviour is forgotten and a reformed client returns. AFA
(Munoz-Gonzalez et al. 2019, "Byzantine-robust federated machine learning through adaptive model
averaging") blocks clients by the same kind of Beta posterior of being good. A client whose
reputation falls under ``threshold`` is quarantined (weight 0) until it climbs back over
``release`` (hysteresis). The agreement and norm rules above, and the handling of rejections
below, are our own.

What another layer rejected: a row rejected as malformed (``nonfinite``, ``bad_dtype``, a failed
signature check, a failed ingest; see ``MALFORMED``) earns c = 0. Any other rejection
(``sign_cluster``, ``norm_outlier``, trimming) carries no weight by itself: the row is still
judged by the rule above on its content, like every other row, so an honest row a sign filter
happened to drop keeps its credit, and a sign-flipper the filter dropped still loses its own. The
pipeline may pass the reasons (``observe(..., reasons={row: "stage:why"})``); without them, a
non-finite row, or an all-zero row an earlier layer dropped (validate zeroes the non-finite rows
it rejects), counts as malformed. A client id sent twice in a round is judged once (its first
row). A round teaches nothing (reputations unchanged, except malformed rows) when its statistics
cannot be trusted: fewer than 3 judged rows, at most 2f of them (the median cosine then need not
belong to an honest client; Yin et al. 2018's bound), or an aggregate that is zero or non-finite.

Given ``f`` (the server's assumed Byzantine count; a pipeline passes it), at most f clients are
quarantined at a time, the lowest-scored, and in a round at most f rows leave it counting the rows
earlier layers dropped (a quarantined client whose row they dropped costs nothing more). The
layer never aborts a round, whatever the number of active rows: when its quarantine would take
more than f rows out it quarantines fewer (the lowest-scored) and lets the rest through, listed
in ``report.info["stood_down"]``. In the pipeline the layer weights rows by reputation before
aggregation and learns from the aggregate after it, so it may be listed before or after the
aggregator.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from ..updates import row_dots, row_sq_norms
from .base import Layer, Report
from .coordinate import sorted_column_map
from .validate import INGEST_KEY

#: rejection reasons that mark the row itself as malformed or unauthenticated: contribution 0.
MALFORMED = frozenset({"nonfinite", "bad_dtype", "not_a_tensor", "wrong_size", "missing_signature",
                       "malformed_envelope", "bad_signature", "digest_mismatch", "replayed_nonce",
                       "wrong_run", "stale_round", "unknown_client", "revoked_client"})


def vector_norm(v: torch.Tensor) -> float:
    """|v| in float64 (inf or NaN when v has non-finite values), in numpy: a torch call on a
    vector right after the worker threads' pass pays tens of ms of OpenMP wake-ups."""
    x = v.detach().cpu()
    x = (x.numpy() if x.dtype in (torch.float32, torch.float64) else x.double().numpy()).astype(np.float64)
    return math.sqrt(float(np.einsum("i,i->", x, x)))  # einsum: no BLAS threads to wake


def one_sided_z(values: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """(x - median) / scale, float64, with scale = max(1.4826 * MAD, floor * |median|, 1e-12)."""
    v = values.double()
    med = v.median()
    scale = max(float((v - med).abs().median()) * 1.4826, floor * abs(float(med)), 1e-12)
    return (v - med) / scale


class Reputation(Layer):
    name = "reputation"
    anywhere = True  # may be listed after the aggregator in a config

    def __init__(self, decay: float = 0.9, prior: float = 0.6, threshold: float = 0.3, release: float = 0.5,
                 z_tolerance: float = 3.0, use_validation: bool = True, weight_by_reputation: bool = True,
                 f: int | None = None, agreement: float = 0.2, prior_weight: float = 2.0):
        for pname, v in (("decay", decay), ("prior", prior), ("threshold", threshold), ("release", release)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise PhalanxError(f"reputation: {pname} must be a number in [0, 1], got {v!r}")
        if release < threshold:
            raise PhalanxError(f"reputation: release must be >= threshold ({threshold}), got {release}")
        if isinstance(z_tolerance, bool) or not isinstance(z_tolerance, (int, float)) or not z_tolerance > 0:
            raise PhalanxError(f"reputation: z_tolerance must be > 0, got {z_tolerance!r}")
        if isinstance(agreement, bool) or not isinstance(agreement, (int, float)) or not 0 < agreement <= 1:
            raise PhalanxError(f"reputation: agreement must be a number in (0, 1], got {agreement!r}")
        if isinstance(prior_weight, bool) or not isinstance(prior_weight, (int, float)) or not 0 < prior_weight < 1e6:
            raise PhalanxError(f"reputation: prior_weight must be a number > 0, got {prior_weight!r}")
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
            raise PhalanxError(f"reputation: f must be an integer >= 0 or None, got {f!r}")
        self.decay, self.prior, self.threshold, self.release = float(decay), float(prior), float(threshold), float(release)
        self.z_tolerance, self.agreement, self.prior_weight = float(z_tolerance), float(agreement), float(prior_weight)
        self.use_validation = use_validation
        self.weight_by_reputation = weight_by_reputation
        self.f = f
        self.scores: dict[str, float] = {}
        self.quarantined: set[str] = set()
        self.history: dict[str, list[float]] = {}
        self.evidence: dict[str, list[float]] = {}  # client id -> [alpha, beta]

    def score(self, cid: str) -> float:
        return self.scores.get(cid, self.prior)

    def _evidence(self, cid: str) -> tuple[float, float]:
        """[alpha, beta] of a client; one without a record (unknown, or whose score was set from
        outside) weighs its score as ``prior_weight`` rounds."""
        if cid in self.evidence:
            a, b = self.evidence[cid]
            return a, b
        s = self.score(cid)
        return s * self.prior_weight, (1 - s) * self.prior_weight

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        report = Report(self.name, n=U.shape[0])
        r = torch.tensor([self.score(c) for c in ctx.client_ids[:U.shape[0]]], dtype=torch.float64)
        w = w.clone()
        held = [i for i, cid in enumerate(ctx.client_ids[:U.shape[0]]) if cid in self.quarantined]
        stood_down: list[str] = []
        if self.f is not None:  # with the rows earlier layers dropped, at most f leave the round
            gone = w <= 0
            room = max(0, self.f - int(gone.sum()))
            active = sorted((i for i in held if not gone[i]), key=lambda i: (self.score(ctx.client_ids[i]), i))
            held = [i for i in held if gone[i]] + active[:room]
            stood_down = sorted(ctx.client_ids[i] for i in active[room:])
        for i in held:
            w[i] = 0.0
            report.reject(i, "quarantined")
        if self.weight_by_reputation:
            w = w * r.to(w.dtype)
        report.scores = r
        report.selected = w > 0
        report.info["quarantined"] = sorted(self.quarantined)
        report.info["stood_down"] = stood_down
        return U, w, report

    def malformed(self, U: torch.Tensor, ctx: RoundContext, rejected: torch.Tensor | None,
                  reasons: dict[int, Any] | None, sq: torch.Tensor | None = None) -> torch.Tensor:
        """Bool [n]: rows that are malformed or unauthenticated (contribution 0). ``sq``: the rows'
        squared norms when already known (finite exactly when the row is)."""
        n = U.shape[0]
        if not U.dtype.is_floating_point:
            bad = torch.ones(n, dtype=torch.bool)
        else:
            bad = ~torch.isfinite(row_sq_norms(U) if sq is None else sq)
        for row in ctx.extras.get(INGEST_KEY, {}):
            if 0 <= int(row) < n:
                bad[int(row)] = True
        if reasons is not None:
            for row, why in reasons.items():
                whys = [why] if isinstance(why, str) else list(why)
                if 0 <= int(row) < n and any(str(x).rsplit(":", 1)[-1] in MALFORMED for x in whys):
                    bad[int(row)] = True
        elif rejected is not None and U.dtype.is_floating_point:
            for i in torch.nonzero(rejected.bool() & ~bad).flatten().tolist():
                bad[i] = not bool(U[i].any())  # validate zeroes the non-finite rows it rejects
        return bad

    @staticmethod
    def cosines(dots: torch.Tensor, norms: torch.Tensor, ref_norm: float) -> tuple[torch.Tensor, float]:
        cos = dots / (norms * ref_norm).clamp_min(1e-12)
        return cos, float(cos.median())

    def contributions(self, U: torch.Tensor, g: torch.Tensor, ctx: RoundContext, judged: torch.Tensor,
                      stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """c in [0, 1] for the ``judged`` rows (float64 [n], NaN elsewhere), or None when this round's
        statistics cannot be trusted (see the module docstring). U is read in place: squared norms
        and dot products with g in one pass (``row_dots``; ``stats``: those of every row, when
        already known), never a float64 copy."""
        k = int(judged.sum())
        g_norm = vector_norm(g)
        if k < 3 or (self.f and k <= 2 * self.f) or not math.isfinite(g_norm) or g_norm == 0:
            return None
        idx = torch.nonzero(judged).flatten().cpu()
        rows = None if k == U.shape[0] else idx
        sq, dots = row_dots(U, g, rows) if stats is None else (stats[0][idx], stats[1][idx])
        norms = sq.sqrt()
        cos, ref = self.cosines(dots, norms, g_norm)
        if not ref > 1e-6:  # a plain mean pulled over by attackers: the rows' coordinate-wise median
            k_ = len(idx)
            med = sorted_column_map(U, lambda S: S[:, (k_ - 1) // 2], rows)  # the lower one, as torch's
            cos, ref = self.cosines(row_dots(U, med, rows)[1], norms, vector_norm(med))
        if not ref > 1e-6:  # still no direction the typical row agrees with
            return None
        a = self.agreement
        term = ((cos / ref + a) / (2 * a)).clamp(0, 1)
        if k >= 4:
            term = term * torch.exp(-(one_sided_z(norms) - self.z_tolerance).clamp_min(0))
        if self.use_validation and ctx.val_loss is not None and k >= 4:
            own = torch.tensor([float(ctx.val_loss(ctx.global_params + U[i].to(ctx.global_params.dtype)))
                                for i in idx.tolist()], dtype=torch.float64)
            if bool(torch.isfinite(own).all()):
                term = term * torch.exp(-(one_sided_z(own) - self.z_tolerance).clamp_min(0))
        c = torch.full((U.shape[0],), float("nan"), dtype=torch.float64)
        c[idx] = term
        return c

    def observe(self, U: torch.Tensor, w: torch.Tensor, g: torch.Tensor, ctx: RoundContext,
                rejected: torch.Tensor | None = None, reasons: dict[int, Any] | None = None) -> None:
        """Learn from this round: U and w as this layer received them, g the final aggregate,
        ``rejected`` the rows other stages rejected, ``reasons`` (optional) row -> why (or a list)."""
        ids = ctx.client_ids[:U.shape[0]]
        first: dict[str, int] = {}
        for i, cid in enumerate(ids):
            first.setdefault(cid, i)
        stats = None
        if U.dtype.is_floating_point and math.isfinite(vector_norm(g)):  # one pass over U for both
            stats = row_dots(U, g)
        bad = self.malformed(U, ctx, rejected, reasons, None if stats is None else stats[0])
        c = self.contributions(U, g, ctx, ~bad, stats)
        for cid, i in first.items():
            if bool(bad[i]):
                ci = 0.0
            elif c is None:
                ci = None  # an untrustworthy round: reputation unchanged
            else:
                ci = float(c[i])
            a, b = self._evidence(cid)
            if ci is not None:
                a, b = self.decay * a + ci, self.decay * b + (1 - ci)
            self.evidence[cid] = [a, b]
            r = a / (a + b) if a + b > 0 else self.prior
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
        quarantined, each client's reputation after every round it took part in, and its evidence
        [alpha, beta]. The rest (decay, thresholds, agreement, prior weight, f) is configuration. A
        layer built afresh with the same parameters and given this state continues exactly as the
        saved one would have."""
        return {"scores": dict(self.scores), "quarantined": sorted(self.quarantined),
                "history": {k: list(v) for k, v in self.history.items()},
                "evidence": {k: list(v) for k, v in self.evidence.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return  # a fresh pipeline slot: nothing learnt yet
        keys = {"scores", "quarantined", "history"}  # "evidence" too, except in older checkpoints
        if not isinstance(state, dict) or not keys <= set(state) <= keys | {"evidence"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise PhalanxError(f"reputation: state keys must be {sorted(keys)} and optionally 'evidence', got {got}")
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
        evidence = {}
        try:
            for c, v in dict(state.get("evidence", {})).items():
                a, b = (float(x) for x in v)
                if c not in scores or not (0 <= a < float("inf") and 0 <= b < float("inf")):
                    raise ValueError
                evidence[c] = [a, b]
        except (TypeError, ValueError):
            raise PhalanxError("reputation: state evidence must map scored client ids -> [alpha, beta] "
                               f"(finite, >= 0), got {state.get('evidence')!r:.80}") from None
        self.scores, self.quarantined, self.history = scores, set(quarantined), history
        self.evidence = evidence


@DEFENSES.register("reputation")
def reputation(decay: float = 0.9, prior: float = 0.6, threshold: float = 0.3, release: float = 0.5,
               z_tolerance: float = 3.0, use_validation: bool = True, weight_by_reputation: bool = True,
               f: int | None = None, agreement: float = 0.2, prior_weight: float = 2.0) -> Reputation:
    """Beta reputation with forgetting (direction agreement with the aggregate, one-sided norm and validation
    outlier tests against the round's peers) with quarantine of at most f clients; never aborts a
    round."""
    return Reputation(decay, prior, threshold, release, z_tolerance, use_validation, weight_by_reputation, f,
                      agreement, prior_weight)
