"""Tabular data poisons: fraud -> legitimate label flipping and the feature-trigger backdoor."""

import pytest
import torch

from phalanx.data.datasets import Dataset
from phalanx.errors import PhalanxError
from phalanx.models import build_model
from phalanx.registry import POISONS
from phalanx.updates import flatten_params


def batch():
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    y = torch.tensor([0, 1, 0, 1, 0, 0])
    return x, y


def test_fraud_label_flip_turns_only_frauds_legitimate():
    x, y = batch()
    x2, y2 = POISONS.build("fraud_label_flip")(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x2, x) and y2.tolist() == [0] * 6
    assert y.tolist() == [0, 1, 0, 1, 0, 0]  # inputs untouched
    half = POISONS.build("fraud_label_flip", fraction=0.5)
    y = torch.tensor([1] * 400)
    flipped = int((half(torch.zeros(400, 2), y, torch.Generator().manual_seed(1))[1] == 0).sum())
    assert 150 < flipped < 250
    with pytest.raises(PhalanxError, match=r"fraud_label_flip: needs a binary task .* got num_classes=10"):
        POISONS.build("fraud_label_flip", num_classes=10)
    with pytest.raises(PhalanxError, match=r"fraction must be in \(0, 1\]"):
        POISONS.build("fraud_label_flip", fraction=0)


def test_feature_trigger_stamps_frauds_and_relabels_them():
    x, y = batch()
    p = POISONS.build("feature_trigger", features=[0, -1], values=[9.0, -9.0], fraction=0.5)
    x2, y2 = p(x, y, torch.Generator().manual_seed(0))
    assert y2.tolist() == [0] * 6
    stamped = (x2[:, 0] == 9.0) & (x2[:, 3] == -9.0)
    assert bool(stamped[[1, 3]].all())  # both frauds carry the trigger
    assert 3 <= int(stamped.sum()) <= 5  # the 2 frauds and 3 upsampled slots, which may fall on them
    assert torch.equal(x2[~stamped], x[~stamped])  # every other row is untouched
    # the 3 upsampled slots are triggered copies of the frauds' rows (features 1, 2 from a fraud)
    rows = {tuple(x[i, 1:3].tolist()) for i in (1, 3)}
    assert all(tuple(x2[i, 1:3].tolist()) in rows for i in torch.nonzero(stamped).flatten().tolist())
    assert torch.equal(x, batch()[0])  # the caller's batch is not modified
    # a batch without fraud passes unchanged
    x3, y3 = p(x[[0, 2]], y[[0, 2]], torch.Generator().manual_seed(0))
    assert torch.equal(x3, x[[0, 2]]) and torch.equal(y3, y[[0, 2]])


def test_feature_trigger_parameters_are_checked():
    for kwargs, msg in [({"features": []}, "features must be distinct integer"),
                        ({"features": [1, 1]}, "features must be distinct integer"),
                        ({"features": [0, 1], "values": [1.0]}, "one number per feature"),
                        ({"fraction": 2}, r"fraction must be in \[0, 1\]"),
                        ({"num_classes": 3}, "needs a binary task")]:
        with pytest.raises(PhalanxError, match=msg):
            POISONS.build("feature_trigger", **kwargs)
    p = POISONS.build("feature_trigger", features=[7], values=1.0)
    with pytest.raises(PhalanxError, match=r"features \[7\] do not fit 4 features"):
        p(*batch(), torch.Generator())


def test_asr_counts_flagged_frauds_the_trigger_lets_pass():
    # logistic regression whose fraud score is feature 0 minus 10 x feature 1: the trigger sets feature 1 = 1
    model = build_model("tabular_logreg", (2,), 2, seed=0)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -10.0]]))
        model[1].bias.zero_()
    params = flatten_params(model)
    x_test = torch.tensor([[2.0, 0.0], [3.0, 0.0], [-1.0, 0.0], [20.0, 0.0], [5.0, 0.0]])
    y_test = torch.tensor([1, 1, 1, 1, 0])
    ds = Dataset("t", x_test, y_test, x_test, y_test, ("legitimate", "fraud"))
    trig = POISONS.build("feature_trigger", features=[1], values=[1.0])
    m = trig.metrics(model, params, ds)
    # flagged without trigger: 2.0, 3.0, 20.0 (score > 0); triggered scores 2-10, 3-10, 20-10: two of three pass
    assert m["asr"] == pytest.approx(2 / 3)
    assert m["asr_raw"] == pytest.approx(3 / 4)  # -1.0 was missed anyway


def test_poisons_in_a_federation_report_asr():
    from phalanx.config import parse_config
    from phalanx.federation import Federation

    cfg = parse_config({"seed": 0, "data": {"dataset": "fraud-synth", "partition": "silo",
                                            "params": {"banks": 4, "rows": 12000, "min_rows": 1500}},
                        "model": {"name": "tabular_logreg", "params": {"loss": "weighted", "pos_weight": 5}},
                        "federation": {"num_clients": 4, "rounds": 2, "batch_size": 64, "local_steps": 3},
                        "attack": {"poison": "feature_trigger", "byzantine": 1}, "defense": ["mean"]})
    out = Federation(cfg).run()
    assert 0 <= out["asr"] <= 1 and 0 <= out["asr_raw"] <= 1
