"""Imbalance-aware metrics on cases worked by hand, and against a brute-force reference."""

import numpy as np
import pytest
import torch

from phalanx.errors import PhalanxError
from phalanx.metrics import best_f1, imbalance_metrics, positive_scores, recall_at_fpr


def test_four_points_by_hand():
    # ranked: 0.8 (fraud), 0.4 (legit), 0.35 (fraud), 0.1 (legit)
    m = imbalance_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["auprc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # sum of recall steps x precision
    assert m["roc_auc"] == pytest.approx(3 / 4)  # 3 of 4 (fraud, legit) pairs ranked right
    assert m["best_f1"] == pytest.approx(0.8)  # threshold 0.35: precision 2/3, recall 1
    assert m["recall_at_1fpr"] == pytest.approx(0.5)  # no false positive allowed: only 0.8 is flagged
    assert recall_at_fpr([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], max_fpr=0.5) == pytest.approx(1.0)


def test_ties_are_one_threshold():
    m = imbalance_metrics([0, 1, 0, 1], [0.5] * 4)
    assert m["auprc"] == pytest.approx(0.5) and m["roc_auc"] == pytest.approx(0.5)
    assert m["best_f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert m["recall_at_1fpr"] == 0.0


def test_recall_at_one_percent_fpr_by_hand():
    neg = np.arange(200) / 200  # 0 .. 0.995
    pos = np.array([1.0, 1.01, 1.02, 0.9925, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.r_[np.zeros(200), np.ones(10)]
    s = np.r_[neg, pos]
    # 1% of 200 negatives = 2 false positives (0.99 and 0.995): 4 of 10 frauds lie above 0.99
    assert recall_at_fpr(y, s, 0.01) == pytest.approx(0.4)
    assert recall_at_fpr(y, s, 0.0) == pytest.approx(0.3)


def brute(y, s):
    best, rec = 0.0, 0.0
    for t in np.unique(s):
        flag = s >= t
        tp, fp = int((flag & (y == 1)).sum()), int((flag & (y == 0)).sum())
        p, r = tp / max(tp + fp, 1), tp / int((y == 1).sum())
        if p + r:
            best = max(best, 2 * p * r / (p + r))
        if fp / int((y == 0).sum()) <= 0.01:
            rec = max(rec, r)
    return best, rec


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(600) < 0.05).astype(int)
    s = np.round(rng.normal(y * 1.5, 1.0), 2)  # rounding makes ties
    f1, rec = brute(y, s)
    assert best_f1(y, s) == pytest.approx(f1)
    assert recall_at_fpr(y, s, 0.01) == pytest.approx(rec)


def test_undefined_and_bad_input():
    assert imbalance_metrics([0, 0, 0], [0.1, 0.2, 0.3]) == {
        "auprc": None, "roc_auc": None, "recall_at_1fpr": None, "best_f1": None}
    assert imbalance_metrics([1, 1], [0.1, 0.2])["auprc"] is None
    with pytest.raises(PhalanxError, match="labels must be 0/1"):
        imbalance_metrics([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(PhalanxError, match="3 labels but 2 scores"):
        imbalance_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(PhalanxError, match="1 non-finite score"):
        imbalance_metrics([0, 1], [0.1, float("nan")])


def test_positive_scores_are_class_one_probabilities():
    from phalanx.models import build_model
    from phalanx.updates import flatten_params

    m = build_model("tabular_logreg", (3,), 2, seed=0)
    x = torch.randn(7, 3)
    s = positive_scores(m, flatten_params(m), x)
    assert s.dtype == torch.float64 and s.shape == (7,)
    assert torch.allclose(s, torch.softmax(m(x).double(), 1)[:, 1])
