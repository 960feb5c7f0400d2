"""Tabular data from the user's own file: loading, errors, encoders fitted on training rows, splits."""

import numpy as np
import pandas as pd
import pytest
import torch

from phalanx.config import parse_config
from phalanx.data.tabular import from_frame, load_configured, read_table, stratified_split, tabular
from phalanx.errors import ConfigError, DataError


def bank_frame(n_per_bank=(60, 40, 30), seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for b, n in enumerate(n_per_bank):
        y = np.zeros(n, dtype=int)
        y[: max(2, n // 10)] = 1
        rows.append(pd.DataFrame({
            "bank": f"B{b}", "amount": rng.normal(50 + 10 * b, 5, n), "hour": rng.integers(0, 24, n),
            "online": rng.random(n) < 0.5, "channel": rng.choice(["atm", "pos", "web"], n), "fraud": y}))
    return pd.concat(rows, ignore_index=True)


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "tx.csv"
    bank_frame().to_csv(path, index=False)
    return path


def test_csv_and_parquet_give_the_same_dataset(tmp_path, csv_file):
    pq = tmp_path / "tx.parquet"
    bank_frame().to_parquet(pq, index=False)
    a = tabular(str(csv_file), label="fraud", silo="bank", categorical=["channel"])
    b = tabular(str(pq), label="fraud", silo="bank", categorical=["channel"])
    assert torch.allclose(a.x_train, b.x_train, atol=1e-6) and torch.equal(a.y_train, b.y_train)
    assert a.in_shape == (3 + 3,)  # amount, hour, online + channel=atm/pos/web
    assert a.num_classes == 2 and a.silos == ("B0", "B1", "B2")
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64


def test_test_split_is_stratified_per_silo_and_seeded():
    df = bank_frame((100, 50, 20))
    ds, _ = from_frame(df, name="t", label="fraud", silo="bank", categorical=["channel"], test_fraction=0.2)
    for k, n in enumerate((100, 50, 20)):
        frauds = max(2, n // 10)
        tr, te = ds.silo_train == k, ds.silo_test == k
        assert int(te.sum()) == round(0.2 * frauds) + round(0.2 * (n - frauds))  # per (silo, label) group
        assert int(ds.y_test[te].sum()) == round(0.2 * frauds)
        assert int(tr.sum()) + int(te.sum()) == n
    again, _ = from_frame(df, name="t", label="fraud", silo="bank", categorical=["channel"], test_fraction=0.2)
    assert torch.equal(ds.x_test, again.x_test)


def test_split_keeps_a_training_row_in_every_silo():
    y = np.array([0, 1, 0, 0, 1])
    silos = np.array([0, 0, 1, 1, 1])
    train, test = stratified_split(y, silos, 0.9, seed=3)
    assert set(silos[train]) == {0, 1}
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(5))


def test_encoders_are_fitted_on_training_rows_only():
    df = bank_frame((80, 80))
    ds, enc = from_frame(df, name="t", label="fraud", silo="bank", categorical=["channel"], test_fraction=0.25)
    # numeric columns: mean 0, std 1 on the training rows (not on all rows)
    col = enc.names.index("amount")
    assert abs(float(ds.x_train[:, col].mean())) < 1e-5
    assert abs(float(ds.x_train[:, col].double().std(unbiased=False)) - 1) < 1e-5
    assert abs(float(ds.x_test[:, col].mean())) > 1e-4  # the test rows did not enter the fit
    # a category seen only in test rows gets no column and encodes as all zeros (the split depends
    # only on labels and silos, so it is the same split)
    df2 = df.copy()
    _, idx_test = stratified_split(df2["fraud"].to_numpy(), (df2["bank"] == "B1").to_numpy().astype(int), 0.25, 0)
    df2.loc[idx_test[:3], "channel"] = "unseen"
    ds2, enc2 = from_frame(df2, name="t", label="fraud", silo="bank", categorical=["channel"], test_fraction=0.25)
    assert not any("unseen" in n for n in enc2.names)
    onehot = [i for i, n in enumerate(enc2.names) if n.startswith("channel=")]
    assert int((ds2.x_test[:, onehot].sum(1) == 0).sum()) == 3
    assert torch.all(ds2.x_train[:, onehot].sum(1) == 1)


def test_missing_numeric_values_take_the_training_mean():
    df = bank_frame((50, 50))
    df.loc[5, "amount"] = np.nan
    ds, enc = from_frame(df, name="t", label="fraud", categorical=["channel"], features=["amount", "channel"])
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()
    assert enc.names[0] == "amount" and ds.silo_train is None


def test_string_labels_need_positive(tmp_path):
    df = bank_frame((30, 30))
    df["fraud"] = np.where(df["fraud"] == 1, "fraud", "ok")
    with pytest.raises(DataError, match=r"label column 'fraud' has values .* set data.positive"):
        from_frame(df, name="t", label="fraud", categorical=["channel"])
    ds, _ = from_frame(df, name="t", label="fraud", categorical=["channel", "bank"], positive="fraud")
    assert ds.classes == ("ok", "fraud")
    assert int(ds.y_train.sum() + ds.y_test.sum()) == int((df["fraud"] == "fraud").sum())


@pytest.mark.parametrize("change,kwargs,message", [
    (lambda d: d, {"label": "is_fraud"}, r"no column 'is_fraud' for data.label; columns: bank, amount"),
    (lambda d: d, {"silo": "institution"}, r"no column 'institution' for data.silo"),
    (lambda d: d, {"features": ["amount", "velocity"]}, r"no column 'velocity' for data.features"),
    (lambda d: d, {"categorical": []}, r"feature column 'channel' is not numeric .*declare it in data.categorical"),
    (lambda d: d.assign(fraud=d["fraud"] + (d.index % 3 == 0)), {}, r"label column 'fraud' must be binary .* got 3"),
    (lambda d: d.assign(fraud=0), {}, r"label column 'fraud' must be binary .* got 1"),
    (lambda d: d.assign(bank=d["bank"].where(d.index != 7, None)), {}, r"silo column 'bank' is empty in 1 row"),
    (lambda d: d.assign(bank=d["bank"].where(d.index != 7, "lonely")), {}, r"silo 'lonely' .* has 1 row"),
    (lambda d: d.assign(amount=d["amount"].where(d.index != 2, np.inf)), {}, r"'amount' holds infinite values"),
    (lambda d: d, {"positive": 7}, r"data.positive=7 is not a value of label column 'fraud'"),
    (lambda d: d.assign(fraud=d["fraud"].astype(float).where(d.index != 4, np.nan)), {}, r"1 missing value"),
])
def test_bad_input_is_one_clear_data_error(tmp_path, change, kwargs, message):
    path = tmp_path / "bad.csv"
    change(bank_frame()).to_csv(path, index=False)
    args = {"label": "fraud", "silo": "bank", "categorical": ["channel"], **kwargs}
    with pytest.raises(DataError, match=message):
        tabular(str(path), **args)


def test_missing_corrupt_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=r"file not found: .*nope.csv"):
        read_table(tmp_path / "nope.csv")
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read as PARQUET"):
        read_table(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.csv: cannot read as CSV"):
        read_table(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b,fraud\n")
    with pytest.raises(DataError, match=r"header.csv: the file holds no rows"):
        read_table(header_only)
    with pytest.raises(DataError, match=r"expected a .csv or .parquet file, got .*data.xlsx"):
        read_table(tmp_path / "data.xlsx")


def test_config_fields_for_tabular(csv_file):
    cfg = parse_config({"data": {"dataset": "tabular", "path": str(csv_file), "label": "fraud", "silo": "bank",
                                 "categorical": ["channel"], "partition": "silo"}})
    ds = load_configured(cfg.data)
    assert ds is load_configured(cfg.data)  # memoized per parameters
    assert len(ds.silos) == 3
    with pytest.raises(ConfigError, match=r"dataset 'tabular' needs path and label"):
        parse_config({"data": {"dataset": "tabular"}})
    with pytest.raises(ConfigError, match=r"partition 'silo' needs the silo column: set data.silo"):
        parse_config({"data": {"dataset": "tabular", "path": "x.csv", "label": "y", "partition": "silo"}})
    with pytest.raises(ConfigError, match=r"path, label: only for dataset 'tabular', got dataset 'digits'"):
        parse_config({"data": {"dataset": "digits", "path": "x.csv", "label": "y"}})
    with pytest.raises(ConfigError, match=r"data.partition: .*'silo'"):
        parse_config({"data": {"dataset": "digits", "partition": "banks"}})
