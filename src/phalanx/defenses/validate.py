"""Update validation: reject malformed rows with a recorded reason, never break the round.

``collect_updates`` builds the [n, d] matrix from whatever clients sent (wrong sizes and dtypes
become zero rows with a reason); the ``validate`` layer then rejects non-finite rows and rows
whose norm is far outside the round's distribution (a robust z-score on norms, with the median
and the median absolute deviation). One pass over U finds both (a row's squared norm is finite
exactly when its values are); U itself is passed on, uncopied, unless a row must be zeroed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..context import RoundContext
from ..errors import PhalanxError
from ..registry import DEFENSES
from ..updates import new_matrix, row_sq_norms
from .base import Layer, Report, check_positive

INGEST_KEY = "ingest_rejections"


def collect_updates(raw: Sequence[Any], d: int) -> tuple[torch.Tensor, dict[int, str]]:
    """Stack client updates into float32 [n, d]; malformed ones become zero rows with a reason.

    Reasons: ``not_a_tensor``, ``bad_dtype`` (not floating point), ``wrong_size``.
    """
    U = torch.zeros(len(raw), d, dtype=torch.float32)
    reasons: dict[int, str] = {}
    for i, u in enumerate(raw):
        if isinstance(u, np.ndarray):
            u = torch.from_numpy(u)
        if not isinstance(u, torch.Tensor):
            reasons[i] = "not_a_tensor"
        elif not u.dtype.is_floating_point:
            reasons[i] = "bad_dtype"
        elif u.numel() != d or u.dim() != 1:
            reasons[i] = "wrong_size"
        else:
            U[i] = u.to(torch.float32)
    return U, reasons


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD), float64; 0 when every value is equal."""
    v = values.double()
    med = v.median()
    mad = (v - med).abs().median() * 1.4826
    if float(mad) == 0.0:
        scale = max(float(med.abs()) * 1e-6, 1e-12)
        return (v - med) / scale
    return (v - med) / mad


class Validate(Layer):
    name = "validate"

    def __init__(self, z_threshold: float = 3.5, check_norms: bool = True, min_rows_for_norms: int = 4):
        self.z_threshold = check_positive(self.name, "z_threshold", z_threshold)
        self.check_norms = bool(check_norms)
        self.min_rows_for_norms = int(min_rows_for_norms)

    def __call__(self, U: torch.Tensor, w: torch.Tensor, ctx: RoundContext):
        n, d = U.shape
        report = Report(self.name, n=n)
        expected = ctx.global_params.numel()
        if d != expected:
            raise PhalanxError(f"validate: update matrix has {d} columns, the model has {expected} parameters")
        w = w.clone()
        for row, why in ctx.extras.get(INGEST_KEY, {}).items():
            report.reject(row, why)
        bad_dtype = not U.dtype.is_floating_point
        # one pass: a row's squared norm (float64 sums of float32 blocks) is finite iff the row is
        sq = row_sq_norms(U) if not bad_dtype else torch.full((n,), math.nan, dtype=torch.float64)
        finite = torch.isfinite(sq)
        for row in torch.nonzero(~finite).flatten().tolist():
            report.reject(row, "bad_dtype" if bad_dtype else "nonfinite")
        norms = torch.where(finite, sq.clamp_min(0).sqrt(), 0.0)
        ok = torch.tensor([i not in report.reasons for i in range(n)]) & (w > 0)
        z = torch.zeros(n, dtype=torch.float64)
        if self.check_norms and int(ok.sum()) >= self.min_rows_for_norms:
            z[ok] = robust_z(norms[ok])
            for row in torch.nonzero(ok & (z.abs() > self.z_threshold)).flatten().tolist():
                report.reject(row, "norm_outlier")
        for row in report.reasons:
            w[row] = 0.0
        if not bad_dtype and not bool(finite.all()):  # a copy with the non-finite rows zeroed
            out = new_matrix(n, d, U.dtype) if U.device.type == "cpu" else torch.empty_like(U)
            out.copy_(U)
            out[~finite.to(out.device)] = 0
            U = out
        report.scores = z
        report.selected = w > 0
        report.info.update(median_norm=float(norms[ok].median()) if bool(ok.any()) else None)
        return U, w, report


@DEFENSES.register("validate")
def validate(z_threshold: float = 3.5, check_norms: bool = True) -> Validate:
    """Reject non-finite rows, malformed rows and norm outliers (robust z-score > z_threshold)."""
    return Validate(z_threshold, check_norms)
