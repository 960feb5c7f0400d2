"""Fraud detection across banks: the built-in datasets, the silo partition, tabular models and losses."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from phalanx.config import parse_config
from phalanx.data import datasets as dsmod
from phalanx.data import fraud
from phalanx.data.partition import partition
from phalanx.errors import ConfigError, DataError, PhalanxError
from phalanx.federation import Federation
from phalanx.models import build_model
from phalanx.training import LocalSpec, local_update, vectorized_updates

SMALL = {"banks": 4, "rows": 12000, "min_rows": 1500, "seed": 1}


def fraud_config(**over):
    cfg = {"seed": 0, "data": {"dataset": "fraud-synth", "partition": "silo", "params": dict(SMALL)},
           "model": {"name": "tabular_mlp", "params": {"hidden": [16], "loss": "weighted", "pos_weight": 5}},
           "federation": {"num_clients": 4, "rounds": 2, "batch_size": 64, "lr": 0.05, "local_steps": 3},
           "defense": ["mean"]}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return parse_config(cfg)


def test_fraud_synth_models_banks_of_different_sizes_and_fraud_rates():
    df = fraud.synth_frame(banks=8, seed=0)
    per = df.groupby("bank")["is_fraud"].agg(["size", "mean", "sum"])
    assert len(per) == 8
    assert per["size"].max() > 3 * per["size"].min()  # large and small banks
    assert (per["sum"] >= 20).all()  # every bank has frauds on both sides of the split
    rates = per["mean"]
    assert rates.between(0.00095, 0.0201).all()  # 0.1% to 2%
    assert rates.max() > 3 * rates.min()  # fraud rates differ
    # customers differ by bank (covariate shift) while the session features carry no fraud signal
    means = df.groupby("bank")[["b1", "b2", "b3"]].mean()
    assert float(means.std().mean()) > 0.1
    gap = df.groupby("is_fraud")[["s1", "s2", "s3", "s4"]].mean()
    assert float((gap.loc[1] - gap.loc[0]).abs().max()) < 0.3
    assert df.equals(fraud.synth_frame(banks=8, seed=0))
    assert not df.equals(fraud.synth_frame(banks=8, seed=1))


def test_fraud_synth_dataset_and_bad_parameters():
    ds = fraud.fraud_synth(**SMALL)
    assert ds.num_classes == 2 and ds.classes == ("legitimate", "fraud")
    assert len(ds.silos) == 4 and ds.x_train.ndim == 2 and ds.in_shape == (ds.x_train.shape[1],)
    assert set(ds.silo_train.tolist()) == set(ds.silo_test.tolist()) == {0, 1, 2, 3}
    for k in range(4):
        assert int(ds.y_test[ds.silo_test == k].sum()) > 0 and int(ds.y_train[ds.silo_train == k].sum()) > 0
    with pytest.raises(DataError, match=r"fraud-synth: rows must be >= banks \* min_rows"):
        fraud.synth_frame(banks=10, rows=1000)
    with pytest.raises(DataError, match=r"fraud-synth: fraud_rate must be"):
        fraud.synth_frame(fraud_rate=(0.02, 0.001))


def test_silo_partition_one_bank_per_client():
    silos = torch.tensor([2, 0, 1, 0, 2, 2])
    parts = partition(torch.zeros(6), 3, "silo", silos=silos, names=("a", "b", "c"))
    assert [p.tolist() for p in parts] == [[1, 3], [2], [0, 4, 5]]
    with pytest.raises(PhalanxError, match=r"num_clients must equal the number of silos \(3\), got 4"):
        partition(torch.zeros(6), 4, "silo", silos=silos, names=("a", "b", "c"))
    with pytest.raises(PhalanxError, match=r"silo 'b' has no training rows"):
        partition(torch.zeros(3), 3, "silo", silos=torch.tensor([0, 2, 2]), names=("a", "b", "c"))
    with pytest.raises(PhalanxError, match=r"this dataset has no silo column"):
        partition(torch.zeros(6), 3, "silo")


def test_federation_by_silo_and_other_partitions_on_tabular_data():
    fed = Federation(fraud_config())
    ds = fed.data
    for k, part in enumerate(fed.parts):  # client k holds exactly bank k's training rows
        assert torch.equal(part, torch.nonzero(ds.silo_train == k).flatten())
    out = fed.run()
    assert 0 <= out["accuracy"] <= 1
    m = fed.evaluate()
    for key in ("auprc", "roc_auc", "recall_at_1fpr", "best_f1"):
        assert m[key] is not None and 0 <= m[key] <= 1
    with pytest.raises(PhalanxError, match=r"num_clients must equal the number of silos \(4\), got 5"):
        Federation(fraud_config(federation={"num_clients": 5}))
    for part in ({"partition": "iid"}, {"partition": "dirichlet", "alpha": 0.5}):
        f2 = Federation(fraud_config(data={**part}, federation={"num_clients": 6}))
        assert len(f2.parts) == 6 and sum(len(p) for p in f2.parts) == len(ds.y_train)
        f2.run_round(0)
    with pytest.raises(PhalanxError, match=r"this dataset has no silo column"):
        Federation(parse_config({"data": {"dataset": "digits", "partition": "silo"}, "model": {"name": "logreg"},
                                 "federation": {"num_clients": 3, "rounds": 1}}))


def test_server_data_keeps_silo_ids_aligned():
    fed = Federation(fraud_config(federation={"server_data": 200}))
    assert len(fed.data.silo_train) == len(fed.data.y_train)
    assert sum(len(p) for p in fed.parts) == len(fed.data.y_train)


def test_model_poisoning_attacks_work_on_tabular_updates():
    for name in ("sign_flip", "alie"):
        fed = Federation(fraud_config(attack={"name": name, "byzantine": 1}, federation={"rounds": 3}))
        res = [fed.run_round(r) for r in range(3)]
        assert res[-1].metrics["attacking"]
        assert torch.isfinite(fed.params).all()
        assert res[-1].metrics["auprc"] is not None


# ---------------------------------------------------------------- creditcard (never downloads)


def tiny_creditcard(n=400, frauds=6, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({f"V{i}": rng.normal(0, 1, n) for i in range(1, 29)})
    df["Amount"] = rng.gamma(2, 30, n)
    df["Class"] = pd.Categorical(["1"] * frauds + ["0"] * (n - frauds))  # OpenML's nominal target
    return df


@pytest.fixture
def fake_openml(tmp_path, monkeypatch):
    monkeypatch.setattr(dsmod, "CACHE", tmp_path)
    monkeypatch.setattr(fraud, "EXPECTED", {"rows": 400, "frauds": 6})
    calls = []

    def fetch(data_home):
        calls.append(data_home)
        return tiny_creditcard()

    monkeypatch.setattr(fraud, "_fetch_openml", fetch)
    return calls


def test_creditcard_is_fetched_once_and_checked(tmp_path, fake_openml):
    ds = fraud.creditcard()
    assert len(fake_openml) == 1
    assert ds.num_classes == 2 and ds.in_shape == (29,) and ds.silo_train is None
    assert int(ds.y_train.sum() + ds.y_test.sum()) == 6
    cached = tmp_path / "creditcard" / "creditcard.parquet"
    assert cached.is_file() and (tmp_path / "creditcard" / "creditcard.parquet.sha256").is_file()
    again = fraud.creditcard()
    assert len(fake_openml) == 1  # served from the cache
    assert torch.equal(ds.x_train, again.x_train)
    cached.write_bytes(cached.read_bytes()[:-10])  # truncated
    with pytest.raises(DataError, match=r"creditcard.parquet: checksum mismatch"):
        fraud.creditcard()


def test_creditcard_rejects_an_incomplete_download(tmp_path, monkeypatch, fake_openml):
    monkeypatch.setattr(fraud, "_fetch_openml", lambda home: tiny_creditcard(n=300))
    with pytest.raises(DataError, match=r"expected 400 rows with 6 frauds, got 300 rows with 6 frauds"):
        fraud.creditcard()
    monkeypatch.setattr(fraud, "_fetch_openml", lambda home: tiny_creditcard().drop(columns=["V7"]))
    with pytest.raises(DataError, match=r"missing column\(s\) V7"):
        fraud.creditcard()

    def offline(home):
        raise OSError("network unreachable")

    monkeypatch.setattr(fraud, "_fetch_openml", offline)
    with pytest.raises(DataError, match=r"could not fetch OpenML dataset 1597 \(OSError: network unreachable\)"):
        fraud.creditcard()
    assert not (tmp_path / "creditcard" / "creditcard.parquet").exists()


class FakeOpenML:
    """Stands in for ``sklearn.datasets.fetch_openml``: records each call, returns ``table()`` or raises ``error``."""

    def __init__(self):
        self.calls, self.error, self.table = [], None, tiny_creditcard

    def __call__(self, **kw):
        from sklearn.utils import Bunch

        self.calls.append(kw)
        if self.error is not None:
            raise self.error
        return Bunch(frame=self.table())


@pytest.fixture
def openml(tmp_path, monkeypatch):
    import sklearn.datasets

    monkeypatch.setattr(dsmod, "CACHE", tmp_path)
    monkeypatch.setattr(fraud, "EXPECTED", {"rows": 400, "frauds": 6})
    fake = FakeOpenML()
    monkeypatch.setattr(sklearn.datasets, "fetch_openml", fake)
    return fake


def cache_files(tmp_path):
    folder = tmp_path / "creditcard"
    return folder / "creditcard.parquet", folder / "creditcard.parquet.sha256"


def test_creditcard_first_use_writes_the_cache_with_its_checksum(tmp_path, openml):
    import hashlib

    ds = fraud.creditcard()
    (call,) = openml.calls
    assert call["data_id"] == 1597 and call["as_frame"] is True
    assert Path(call["data_home"]).parent == tmp_path / "creditcard"  # sklearn's own copy inside the cache
    path, digest = cache_files(tmp_path)
    assert digest.read_text().split() == [hashlib.sha256(path.read_bytes()).hexdigest(), "creditcard.parquet"]
    assert sorted(p.name for p in path.parent.iterdir() if p.is_file()) == [path.name, digest.name]  # no .part
    table = pd.read_parquet(path)
    assert table["Class"].tolist() == [1] * 6 + [0] * 394 and len(ds.y_train) + len(ds.y_test) == 400


def test_creditcard_later_use_reads_the_cache_without_fetching(tmp_path, openml):
    first = fraud.creditcard()
    openml.error = AssertionError("fetched again")
    again = fraud.creditcard()
    assert len(openml.calls) == 1
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)


def _flip_a_byte(path, digest):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, one byte changed
    path.write_bytes(bytes(data))


TAMPER = {"truncated": lambda p, d: p.write_bytes(p.read_bytes()[:-10]), "byte flipped": _flip_a_byte,
          "checksum edited": lambda p, d: d.write_text("0" * 64 + "  creditcard.parquet\n"),
          "checksum empty": lambda p, d: d.write_text(""), "checksum deleted": lambda p, d: d.unlink()}


@pytest.mark.parametrize("how", list(TAMPER))
def test_creditcard_tampered_cache_is_an_error_naming_the_file_not_a_refetch(tmp_path, openml, how):
    fraud.creditcard()
    path, digest = cache_files(tmp_path)
    TAMPER[how](path, digest)
    kept = path.read_bytes()
    with pytest.raises(DataError, match=re.escape(str(path)) + r": (checksum mismatch|its recorded checksum).*"
                       r"delete (it|the file) to fetch it again"):
        fraud.creditcard()
    assert len(openml.calls) == 1 and path.read_bytes() == kept  # neither fetched nor overwritten
    path.unlink()  # what the message says to do
    fraud.creditcard()
    assert len(openml.calls) == 2 and digest.is_file()


def test_creditcard_cache_replaced_with_its_checksum_is_still_checked(tmp_path, openml):
    import hashlib

    fraud.creditcard()
    path, digest = cache_files(tmp_path)
    tiny_creditcard(n=300).assign(Class=lambda f: (f["Class"] == "1").astype("int64")).to_parquet(path)
    digest.write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(DataError, match=re.escape(str(path)) + r": expected 400 rows with 6 frauds, got 300 rows"):
        fraud.creditcard()


def test_creditcard_failed_download_is_a_clear_error_and_leaves_no_cache(tmp_path, openml):
    from urllib.error import URLError

    openml.error = URLError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(DataError, match=r"creditcard: could not fetch OpenML dataset 1597 \(URLError: .*name "
                       r"resolution.*\); check the network"):
        fraud.creditcard()
    openml.error, openml.table = None, lambda: tiny_creditcard(n=399)  # a short download
    with pytest.raises(DataError, match=r"OpenML dataset 1597: expected 400 rows"):
        fraud.creditcard()
    path, digest = cache_files(tmp_path)
    assert not path.exists() and not digest.exists() and not path.with_suffix(".parquet.part").exists()


def test_creditcard_interrupted_first_use_fetches_again(tmp_path, openml, monkeypatch):
    real = fraud._sha256

    def crash(p):
        raise KeyboardInterrupt

    monkeypatch.setattr(fraud, "_sha256", crash)  # stopped while the cache was being written
    with pytest.raises(KeyboardInterrupt):
        fraud.creditcard()
    path, _ = cache_files(tmp_path)
    assert not path.exists() and not path.with_suffix(".parquet.part").exists()
    monkeypatch.setattr(fraud, "_sha256", real)
    fraud.creditcard()  # no Parquet without its checksum: fetched again, not an error
    assert len(openml.calls) == 2


# ---------------------------------------------------------------- tabular models and losses


def test_tabular_models_take_feature_vectors():
    for name in ("tabular_mlp", "tabular_logreg", "logreg", "mlp"):
        m = build_model(name, (7,), 2, seed=0)
        assert m(torch.randn(5, 7)).shape == (5, 2)
    assert not hasattr(build_model("tabular_mlp", (7,), 2, seed=0), "loss")  # plain cross-entropy


def test_weighted_and_focal_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = build_model("tabular_mlp", (3,), 2, 0, loss="weighted", pos_weight=4.0).loss
    assert torch.allclose(w(logits, y, reduction="none"), ce * torch.tensor([1.0, 4.0, 4.0]))
    assert torch.allclose(w(logits, y), (ce * torch.tensor([1.0, 4.0, 4.0])).mean())
    f = build_model("tabular_logreg", (3,), 2, 0, loss="focal", gamma=2.0).loss
    p = torch.softmax(logits, 1)[torch.arange(3), y]
    assert torch.allclose(f(logits, y, reduction="none"), (1 - p) ** 2 * ce)
    for bad, msg in [({"loss": "hinge"}, "loss must be one of ce, weighted, focal"),
                     ({"loss": "weighted"}, "needs pos_weight or class_weights"),
                     ({"pos_weight": -1}, "pos_weight must be a number > 0"),
                     ({"class_weights": [1.0]}, "class_weights must be 2 numbers > 0"),
                     ({"hidden": [0]}, "hidden must be widths >= 1")]:
        with pytest.raises(ConfigError, match=msg):
            build_model("tabular_mlp", (3,), 2, 0, **bad)


def test_both_training_engines_use_the_models_loss():
    torch.manual_seed(0)
    x, y = torch.randn(50, 6), (torch.rand(50) < 0.2).long()
    model = build_model("tabular_mlp", (6,), 2, 0, hidden=[8], loss="weighted", pos_weight=9.0)
    plain = build_model("tabular_mlp", (6,), 2, 0, hidden=[8])
    from phalanx.updates import flatten_params

    p0 = flatten_params(model)
    spec = LocalSpec(epochs=1, batch_size=16, lr=0.1, momentum=0.9)
    seq, _ = local_update(model, p0, x, y, spec, torch.Generator().manual_seed(1))
    vec, _ = vectorized_updates(model, p0, [(x, y)], spec, [torch.Generator().manual_seed(1)], [None])
    ref, _ = local_update(plain, p0, x, y, spec, torch.Generator().manual_seed(1))
    assert torch.allclose(seq, vec[0], atol=1e-5)
    assert not torch.allclose(seq, ref, atol=1e-4)  # the weighting changed the update
