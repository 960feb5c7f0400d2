"""Round metrics: detection precision/recall, per-client statistics of the update matrix, and the
imbalance-aware metrics of binary tasks (AUPRC, ROC-AUC, recall at 1% FPR, best F1)."""

from __future__ import annotations

import numpy as np
import torch

from .errors import PhalanxError


def detection(discarded: torch.Tensor, malicious: torch.Tensor) -> dict[str, float | None]:
    """Precision and recall of ``discarded`` (bool [n]) as a detector of ``malicious`` (bool [n]).

    Precision is None when nothing was discarded; recall is None when nobody was malicious.
    """
    discarded, malicious = discarded.bool(), malicious.bool()
    tp = int((discarded & malicious).sum())
    flagged, bad = int(discarded.sum()), int(malicious.sum())
    return {"det_precision": tp / flagged if flagged else None,
            "det_recall": tp / bad if bad else None,
            "det_false_positive": int((discarded & ~malicious).sum())}


def client_stats(U: torch.Tensor, g: torch.Tensor,
                 block_bytes: int = 32 << 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L2 norm of each row, cosine of each row with the aggregate g, float64 [n] each; whether the
    row is finite, bool [n]). A row with a NaN or inf counts as zeros. Computed in float64 over
    blocks of rows of about ``block_bytes``, so no float64 copy of the whole of U is made; blocks
    are a multiple of 64 rows, so BLAS's matrix-vector kernels (which take rows in groups) give
    each row the bits they give it in one product over all of U."""
    g64 = g.double()
    n, d = U.shape
    norms, dots = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    finite = torch.empty(n, dtype=torch.bool)
    step = max(64, block_bytes // (8 * max(d, 1)) // 64 * 64)
    buf = torch.empty(min(step, n), d, dtype=torch.float64)  # one buffer: fresh blocks cost page faults
    for i in range(0, n, step):
        B = buf[:min(step, n - i)]
        B.copy_(U[i:i + step])
        nb = B.norm(dim=1)
        # squares of float32 values cannot overflow float64: the norm is finite iff the row is
        ok = torch.isfinite(nb) if U.element_size() <= 4 else torch.isfinite(B).all(1)
        if not bool(ok.all()):
            B[~ok] = 0.0
            nb = B.norm(dim=1)
        finite[i:i + step], norms[i:i + step], dots[i:i + step] = ok, nb, B @ g64
    return norms, dots / (norms * g64.norm()).clamp_min(1e-12), finite


# ---------------------------------------------------------------- binary, imbalanced tasks (fraud)


@torch.no_grad()
def positive_scores(model, params: torch.Tensor, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """P(class 1 | x) under ``params`` (softmax of a two-class model), float64 [N]."""
    from .updates import load_flat

    load_flat(model, params)
    model.eval()
    out = [torch.softmax(model(x[s:s + batch_size]).double(), 1)[:, 1] for s in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def recall_at_fpr(y_true, scores, max_fpr: float = 0.01) -> float | None:
    """The highest recall (TPR) of a threshold rule ``score >= t`` whose false-positive rate is at most
    ``max_fpr``; None when y_true lacks either class."""
    from sklearn.metrics import roc_curve

    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max())


def best_f1(y_true, scores) -> float | None:
    """The F1 score of the best threshold rule ``score >= t`` (over every observed score); None
    without positives."""
    from sklearn.metrics import precision_recall_curve

    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if not (y == 1).any():
        return None
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
    return float(f1.max())


def imbalance_metrics(y_true, scores) -> dict[str, float | None]:
    """AUPRC (average precision), ROC-AUC, recall at 1% false-positive rate and F1 at the best
    threshold of fraud scores (higher = more likely class 1). Each is None when the labels lack a
    class (the metric is undefined), never a silent 0."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise PhalanxError(f"imbalance_metrics: {len(y)} labels but {len(s)} scores")
    if len(y) and not set(np.unique(y).tolist()) <= {0, 1}:
        raise PhalanxError(f"imbalance_metrics: labels must be 0/1, got values {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(s).all():
        raise PhalanxError(f"imbalance_metrics: {int((~np.isfinite(s)).sum())} non-finite score(s)")
    both = len(y) > 0 and 0 < int(y.sum()) < len(y)
    return {"auprc": float(average_precision_score(y, s)) if both else None,
            "roc_auc": float(roc_auc_score(y, s)) if both else None,
            "recall_at_1fpr": recall_at_fpr(y, s, 0.01) if both else None,
            "best_f1": best_f1(y, s) if both else None}
