"""Norm clipping: a fixed bound, the round's median norm, or a quantile tracked across rounds.

The tracked quantile follows Andrew et al. (NeurIPS 2021, "Differentially private learning with
adaptive clipping"): C <- C * exp(-eta * (b - q)), where b is the fraction of norms at most C.
Unlike that paper, b is not noised: the tracked bound depends on past rounds' norms.

Every accepted row leaves with norm at most the round's bound, reported as ``info["norm_bound"]``
(what central DP calibrates its noise to), up to float32 rounding (norms are float32 block sums
added in float64). U passes on uncopied when no row is clipped; otherwise one new matrix is
written in a single pass. The tracked bound is the layer's state
(``state_dict`` / ``load_state_dict``), so a resumed run clips exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from ..updates import column_tasks, new_matrix, readable, row_sq_norms, run_chunks
from .base import Layer, Report, check_positive


def scale_rows(U: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A new matrix with row i = U_i * scale_i (float64 products rounded to U's dtype; rows with
    scale 1 copied bit for bit), in one pass over U: each worker takes a chunk of columns and
    writes it row by row (one numpy call per row, no fancy-indexed temporaries)."""
    if U.device.type != "cpu" or U.dtype not in (torch.float32, torch.float64):
        return (U.double() * scale.to(U.device)[:, None]).to(U.dtype)
    A = readable(U)
    n, d = A.shape
    out_t = new_matrix(n, d, U.dtype)
    out = out_t.numpy()
    s = scale.cpu().double().numpy()
    tasks, _ = column_tasks(d, n, A.itemsize)

    def work(t):
        j, e = t
        for i in range(n):
            if s[i] == 1:
                out[i, j:e] = A[i, j:e]
            else:  # float32 * float64 -> float64, then rounded
                np.multiply(A[i, j:e], s[i], out=out[i, j:e], dtype=np.float64, casting="unsafe")

    run_chunks(tasks, work)
    return out_t


class Clip(Layer):
    name = "clip"
    bounds_norm = True

    def __init__(self, max_norm: float | str = "auto", quantile: float = 0.5, eta: float = 0.2,
                 initial: float = 1.0):
        if isinstance(max_norm, str):
            if max_norm not in ("auto", "quantile"):
                raise PhalanxError(f"clip: max_norm must be a number > 0, 'auto' or 'quantile', got {max_norm!r}")
        else:
            check_positive(self.name, "max_norm", max_norm)
        if not 0 < quantile < 1:
            raise PhalanxError(f"clip: quantile must be in (0, 1), got {quantile}")
        self.mode = max_norm if isinstance(max_norm, str) else "fixed"
        self.max_norm = None if isinstance(max_norm, str) else float(max_norm)
        self.quantile = float(quantile)
        self.eta = check_positive(self.name, "eta", eta)
        self.bound = check_positive(self.name, "initial", initial)

    def current_bound(self, norms: torch.Tensor) -> float:
        if self.mode == "fixed":
            return self.max_norm
        if self.mode == "auto":
            return float(norms.median())
        return self.bound

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        report = Report(self.name, n=U.shape[0])
        idx = torch.nonzero(w > 0).flatten().cpu()
        if len(idx) == 0:
            return U, w, report
        norms = row_sq_norms(U)[idx].sqrt()
        bound = self.current_bound(norms)
        scale = torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
        full = torch.ones(U.shape[0], dtype=torch.float64)
        full[idx] = scale
        if not bool((full == 1).all()):  # otherwise U passes on uncopied
            U = scale_rows(U, full)
        if self.mode == "quantile":
            below = float((norms <= self.bound).double().mean())
            self.bound *= math.exp(-self.eta * (below - self.quantile))
        report.scores = torch.full((U.shape[0],), float("nan"), dtype=torch.float64)
        report.scores[idx] = norms
        report.selected = w > 0
        report.info.update(bound=bound, norm_bound=bound, clipped=int((scale < 1).sum()))
        return U, w, report

    def state_dict(self) -> dict[str, Any]:
        return {"bound": self.bound}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) - {"bound"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise PhalanxError(f"clip: state must have the key 'bound' only, got {got}")
        if "bound" in state:
            bound = state["bound"]
            if (isinstance(bound, bool) or not isinstance(bound, (int, float))
                    or not math.isfinite(bound) or not bound > 0):
                raise PhalanxError(f"clip: state 'bound' must be a finite number > 0, got {bound!r}")
            self.bound = float(bound)


@DEFENSES.register("clip")
def clip(max_norm: float | str = "auto", quantile: float = 0.5, eta: float = 0.2, initial: float = 1.0) -> Clip:
    """Clip each update's L2 norm: fixed, 'auto' (the round's median norm) or 'quantile' (tracked)."""
    return Clip(max_norm, quantile, eta, initial)
