"""Round metrics: detection precision/recall and per-client statistics of the update matrix."""

from __future__ import annotations

import torch


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


def client_stats(U: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2 norm of each row, cosine of each row with the aggregate g), both [n], float64."""
    U64, g64 = U.double(), g.double()
    norms = U64.norm(dim=1)
    cos = (U64 @ g64) / (norms * g64.norm()).clamp_min(1e-12)
    return norms, cos
