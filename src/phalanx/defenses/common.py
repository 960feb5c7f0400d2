"""Checks and reports shared by the aggregators (robust.py and the modules split from it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import PhalanxError
from ..updates import row_sq_norms
from .base import Report, active, require_rows


def _check(name: str, U, w) -> None:
    if not isinstance(U, torch.Tensor) or U.ndim != 2 or not U.is_floating_point():
        got = tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__
        raise PhalanxError(f"{name}: U must be a float tensor of shape [n, d], got {got}")
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (U.shape[0],):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise PhalanxError(f"{name}: w must have shape [{U.shape[0]}] (one weight per row), got {got}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise PhalanxError(f"{name}: weights must be finite and >= 0, got {w.tolist()}")


def prepare(name: str, U: torch.Tensor, w: torch.Tensor, finite: bool = False):
    """Check (U, w) and return the active rows: (Ua, wa, idx). Avoids a copy when all are active.

    ``finite``: the rule cannot work around NaN/inf rows (a clustering, an eigendecomposition), so
    active rows with such values are a clear error rather than a numerical library's crash."""
    _check(name, U, w)
    U = U.detach()
    if bool((w > 0).all()):
        Ua, wa, idx = U, w, torch.arange(U.shape[0], device=w.device)
    else:
        Ua, wa, idx = active(U, w)
    if Ua.shape[0] == 0:
        raise PhalanxError(f"{name}: every row has weight 0; nothing to aggregate")
    if finite:  # one pass: a row's squared norm is finite exactly when its values are
        ok = torch.isfinite(row_sq_norms(Ua)).to(idx.device)
    if finite and not bool(ok.all()):
        bad = idx[~ok].tolist()
        raise PhalanxError(f"{name}: rows {bad} have NaN/inf values; put the 'validate' layer before it")
    return Ua, wa, idx


def prepare_rows(name: str, U: torch.Tensor, w: torch.Tensor):
    """Check (U, w) and return (U, wa, idx, rows) without copying: ``rows`` is None when every
    row is active, else ``idx`` (the active rows, which the kernels read in place)."""
    _check(name, U, w)
    idx = torch.nonzero(w > 0).flatten().cpu()
    if len(idx) == 0:
        raise PhalanxError(f"{name}: every row has weight 0; nothing to aggregate")
    rows = None if len(idx) == U.shape[0] else idx
    return U.detach(), w[idx.to(w.device)], idx, rows


def make_report(name: str, n: int, idx: torch.Tensor, scores: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, reason: str | None = None, **info: Any) -> Report:
    """Report over the full n rows from per-active-row ``scores`` and bool ``keep`` (None: all)."""
    idx = idx.cpu()
    rep = Report(name, n=n, info=info)
    if scores is not None:
        full = torch.full((n,), float("nan"), dtype=torch.float64)
        full[idx] = scores.detach().double().cpu()
        rep.scores = full
    sel = torch.zeros(n, dtype=torch.bool)
    keep = torch.ones(len(idx), dtype=torch.bool) if keep is None else keep.cpu().bool()
    sel[idx[keep]] = True
    rep.selected = sel
    if reason is not None:
        for row in idx[~keep].tolist():
            rep.reject(row, reason)
    return rep


def check_int(name: str, param: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PhalanxError(f"{name}: {param} must be an integer >= {low}, got {value!r}")
    return value


def finite_or_raise(name: str, g: torch.Tensor) -> torch.Tensor:
    ok = (bool(np.isfinite(g.detach().numpy()).all()) if g.device.type == "cpu" and g.dtype in
          (torch.float32, torch.float64) else bool(torch.isfinite(g).all()))  # numpy: no thread wake-ups
    if not ok:
        raise PhalanxError(f"{name}: the aggregate has non-finite coordinates (too many rows with "
                           "NaN/inf values); put the 'validate' layer before it")
    return g


def row_norms(U: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row as float64 [n] (one pass; norms have no cancellation to fear)."""
    return torch.linalg.vector_norm(U, dim=1).double()


def honest_majority(name: str, n: int, f: int) -> None:
    """The bound every rule needs at least: n > 2f (fewer than half of the rows Byzantine)."""
    require_rows(name, n, 2 * f + 1, "n > 2f", f)
