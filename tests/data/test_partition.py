import numpy as np
import pytest
import torch

from phalanx.data.partition import partition
from phalanx.errors import PhalanxError

LABELS = torch.from_numpy(np.random.default_rng(0).integers(0, 10, 5000))


@pytest.mark.parametrize("scheme,params", [("iid", {}), ("dirichlet", {"alpha": 0.1}),
                                           ("dirichlet", {"alpha": 5.0}), ("shards", {"shards_per_client": 2})])
def test_every_sample_with_exactly_one_client(scheme, params):
    parts = partition(LABELS, 25, scheme, seed=1, **params)
    assert len(parts) == 25
    assert all(len(p) > 0 for p in parts)
    allidx = torch.cat(parts)
    assert len(allidx) == len(LABELS)
    assert torch.equal(allidx.sort().values, torch.arange(len(LABELS)))


def test_seeded_and_seed_sensitive():
    a = partition(LABELS, 10, "dirichlet", seed=4, alpha=0.5)
    b = partition(LABELS, 10, "dirichlet", seed=4, alpha=0.5)
    c = partition(LABELS, 10, "dirichlet", seed=5, alpha=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and torch.equal(x, y) for x, y in zip(a, c))


def label_skew(parts, labels, classes=10):
    """Mean total-variation distance between each client's label distribution and the global one."""
    glob = torch.bincount(labels, minlength=classes).double()
    glob /= glob.sum()
    tv = []
    for p in parts:
        h = torch.bincount(labels[p], minlength=classes).double()
        tv.append(0.5 * (h / h.sum() - glob).abs().sum())
    return float(torch.stack(tv).mean())


def test_label_skew_grows_as_alpha_shrinks():
    skews = [label_skew(partition(LABELS, 20, "dirichlet", seed=0, alpha=a), LABELS) for a in (100, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    iid_skew = label_skew(partition(LABELS, 20, "iid", seed=0), LABELS)
    assert iid_skew < skews[1]


def test_shards_limit_classes_per_client():
    parts = partition(LABELS, 20, "shards", seed=0, shards_per_client=2)
    # sorted-label shards of 125 samples span at most 2 labels each
    assert max(len(torch.unique(LABELS[p])) for p in parts) <= 4


def test_errors():
    with pytest.raises(PhalanxError, match="unknown scheme"):
        partition(LABELS, 5, "bogus")
    with pytest.raises(PhalanxError, match="alpha must be > 0"):
        partition(LABELS, 5, "dirichlet", alpha=0)
    with pytest.raises(PhalanxError, match="at least one sample per client"):
        partition(LABELS[:3], 5, "iid")
