"""Tabular datasets from the user's own CSV or Parquet file (binary tasks such as fraud detection).

A config names the file and its columns::

    data: {dataset: tabular, path: transactions.parquet, label: is_fraud, silo: bank,
           categorical: [channel], partition: silo}

* ``label``: a binary column; the positive class (fraud) is 1 / True, or ``positive`` when the
  values are anything else.
* ``silo`` (optional): the column naming the institution that holds the row; it drives the
  ``silo`` partition (one client per bank) and the per-silo stratified test split.
* ``features``: the feature columns (default: every other column); ``categorical`` columns are
  one-hot encoded, every other feature must be numeric (bool counts as numeric).

The test split is drawn per (silo, label) group with a fixed seed, so every bank keeps its share
of frauds on both sides. Standardisation (mean, std) and the one-hot levels are fitted on the
training rows only; test rows are transformed with them (unseen categories become all-zero, a
missing numeric value takes the training mean, i.e. 0 after scaling). In a real cross-silo
deployment these statistics are a first federated pass (per-silo sums, squared sums, level
sets); here the simulator computes them on the pooled training rows.

Every problem with the file or its columns is one ``DataError`` naming the file and the column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..registry import DATASETS
from .datasets import Dataset, load_dataset

SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_LEVELS = 200  # a categorical column with more training levels than this is refused


def read_table(path: str | Path):
    """A pandas DataFrame from a .csv (optionally .gz/.zip/.bz2/.xz) or .parquet/.pq file."""
    import pandas as pd

    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zip", ".zst"):
        suffixes = suffixes[:-1]
    kind = SUFFIXES.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise DataError(f"data.path: expected a .csv or .parquet file, got {p}")
    if not p.is_file():
        raise DataError(f"data.path: file not found: {p}")
    try:
        frame = pd.read_csv(p, low_memory=False) if kind == "csv" else pd.read_parquet(p)
    except Exception as e:  # pandas/pyarrow raise many types for a corrupt or truncated file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{p}: cannot read as {kind.upper()} (corrupt or truncated?): {reason}") from None
    if len(frame) == 0:
        raise DataError(f"{p}: the file holds no rows")
    return frame


def _names(cols: Sequence[str], limit: int = 12) -> str:
    cols = [str(c) for c in cols]
    more = f", ... ({len(cols)} in all)" if len(cols) > limit else ""
    return ", ".join(cols[:limit]) + more


def _column(frame, col: str, where: str, what: str):
    if col not in frame.columns:
        raise DataError(f"{where}: no column {col!r} for {what}; columns: {_names(frame.columns)}")
    return frame[col]


def binary_labels(values, positive: Any, where: str, col: str) -> tuple[np.ndarray, tuple[str, str]]:
    """(int64 labels 0/1, (negative name, positive name)) from a label column."""
    import pandas as pd

    if values.isna().any():
        raise DataError(f"{where}: label column {col!r} has {int(values.isna().sum())} missing value(s)")
    levels = list(pd.unique(values))
    if len(levels) != 2:
        shown = ", ".join(repr(v) for v in sorted(levels, key=str)[:5])
        raise DataError(f"{where}: label column {col!r} must be binary (2 distinct values), got {len(levels)}: "
                        f"{shown}{', ...' if len(levels) > 5 else ''}")
    if positive is None:
        as_text = {str(v).strip().lower() for v in levels}
        if as_text in ({"0", "1"}, {"0.0", "1.0"}, {"false", "true"}):
            pos = next(v for v in levels if str(v).strip().lower() in ("1", "1.0", "true"))
        else:
            raise DataError(f"{where}: label column {col!r} has values {levels[0]!r} and {levels[1]!r}: set "
                            f"data.positive to the one meaning fraud (the positive class)")
    else:
        hit = [v for v in levels if v == positive or str(v) == str(positive)]
        if not hit:
            raise DataError(f"{where}: data.positive={positive!r} is not a value of label column {col!r} "
                            f"(values: {levels[0]!r}, {levels[1]!r})")
        pos = hit[0]
    neg = levels[1] if levels[0] is pos else levels[0]
    y = np.asarray(values.astype(str) == str(pos), dtype=np.int64)
    return y, (str(neg), str(pos))


def stratified_split(labels: np.ndarray, silos: np.ndarray, test_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), sorted: in each (silo, label) group, ``round(test_fraction *
    size)`` rows (drawn with ``seed``) go to the test side. Every silo keeps at least one training
    row; a group of one row stays in training."""
    if not 0 < test_fraction < 1:
        raise DataError(f"data.test_fraction: must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng([seed, 29])
    test = np.zeros(len(labels), dtype=bool)
    for s in np.unique(silos):
        in_silo = silos == s
        for c in np.unique(labels[in_silo]):
            idx = np.nonzero(in_silo & (labels == c))[0]
            k = int(math.floor(test_fraction * len(idx) + 0.5))
            k = min(k, len(idx) - 1) if len(idx) > 1 else 0
            test[rng.permutation(idx)[:k]] = True
        if test[in_silo].all():  # keep one training row in every silo
            test[np.nonzero(in_silo)[0][0]] = False
    return np.nonzero(~test)[0], np.nonzero(test)[0]


@dataclass
class Encoder:
    """Standardisation and one-hot encoding, fitted on training rows (``fit``), applied anywhere.

    ``columns`` lists (column, 'numeric' | 'categorical') in the order the encoded features come:
    a numeric column gives one feature, a categorical one a feature per training level.
    """

    columns: list[tuple[str, str]]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    levels: dict[str, list[str]] = field(default_factory=dict)

    def fit(self, frame, where: str = "data") -> "Encoder":
        for c, kind in self.columns:
            if kind == "numeric":
                v = frame[c].astype("float64")
                mu = float(v.mean()) if v.notna().any() else 0.0
                sd = float(v.std(ddof=0)) if v.notna().sum() > 1 else 0.0
                self.mean[c], self.std[c] = mu, sd if sd > 1e-12 else 1.0
            else:
                lv = sorted(frame[c].dropna().astype(str).unique().tolist())
                if len(lv) > MAX_LEVELS:
                    raise DataError(f"{where}: categorical column {c!r} has {len(lv)} levels in the training "
                                    f"rows (at most {MAX_LEVELS}); drop it from data.features or bucket it")
                self.levels[c] = lv
        return self

    @property
    def names(self) -> list[str]:
        """The encoded feature names: a numeric column's name, 'column=level' for each one-hot level."""
        return [n for c, kind in self.columns
                for n in ([c] if kind == "numeric" else [f"{c}={lv}" for lv in self.levels[c]])]

    def transform(self, frame) -> np.ndarray:
        parts = [np.zeros((len(frame), 0))]
        for c, kind in self.columns:
            if kind == "numeric":
                v = frame[c].astype("float64").to_numpy()
                v = np.where(np.isnan(v), self.mean[c], v)
                parts.append(((v - self.mean[c]) / self.std[c])[:, None])
            elif self.levels[c]:
                text = frame[c].astype(str).to_numpy()
                known = frame[c].notna().to_numpy()
                parts.append(np.stack([(text == level) & known for level in self.levels[c]], axis=1))
        return np.concatenate(parts, axis=1).astype(np.float32)


def _feature_columns(frame, label: str, silo: str | None, features, categorical, where: str):
    """[(column, 'numeric' | 'categorical')] in feature order, checked."""
    import pandas as pd

    categorical = list(categorical or [])
    for c in categorical:
        _column(frame, c, where, "data.categorical")
    if features is None:
        features = [c for c in frame.columns if c not in (label, silo)]
    else:
        features = list(features)
        for c in features:
            _column(frame, c, where, "data.features")
        features += [c for c in categorical if c not in features]
    for c in features:
        if c in (label, silo):
            role = "label" if c == label else "silo"
            raise DataError(f"{where}: column {c!r} is the {role} column; it cannot also be a feature")
    if not features:
        raise DataError(f"{where}: no feature columns left besides label {label!r}"
                        + (f" and silo {silo!r}" if silo else ""))
    columns = []
    for c in features:
        if c in categorical:
            columns.append((c, "categorical"))
            continue
        col = frame[c]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            values = col.astype("float64")
            if np.isinf(values.to_numpy()).any():
                raise DataError(f"{where}: feature column {c!r} holds infinite values")
            columns.append((c, "numeric"))
            continue
        example = next((v for v in col.dropna().tolist() if not _is_number(v)), None)
        raise DataError(f"{where}: feature column {c!r} is not numeric (dtype {col.dtype}, e.g. {example!r}); "
                        f"declare it in data.categorical or leave it out of data.features")
    return columns


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def from_frame(frame, *, name: str, label: str, silo: str | None = None, features: Sequence[str] | None = None,
               categorical: Sequence[str] = (), positive: Any = None, test_fraction: float = 0.2,
               split_seed: int = 0, where: str | None = None,
               classes: tuple[str, str] | None = None) -> tuple[Dataset, Encoder]:
    """A binary tabular Dataset (and its fitted Encoder) from a pandas DataFrame."""
    where = where or name
    y_all, names = binary_labels(_column(frame, label, where, "data.label"), positive, where, label)
    silo_names: tuple[str, ...] = ()
    if silo is not None:
        col = _column(frame, silo, where, "data.silo")
        blank = col.isna() | (col.astype(str).str.strip() == "")
        if blank.any():
            raise DataError(f"{where}: silo column {silo!r} is empty in {int(blank.sum())} row(s) "
                            f"(first at row {int(np.nonzero(blank.to_numpy())[0][0])})")
        text = col.astype(str).to_numpy()
        silo_names = tuple(sorted(set(text.tolist())))
        index = {s: i for i, s in enumerate(silo_names)}
        silo_all = np.array([index[s] for s in text], dtype=np.int64)
        counts = np.bincount(silo_all, minlength=len(silo_names))
        if (counts < 2).any():
            bad = silo_names[int(np.argmin(counts))]
            raise DataError(f"{where}: silo {bad!r} (column {silo!r}) has {int(counts.min())} row; every silo "
                            f"needs at least 2 (training and test rows)")
    else:
        silo_all = np.zeros(len(frame), dtype=np.int64)
    columns = _feature_columns(frame, label, silo, features, categorical, where)
    train, test = stratified_split(y_all, silo_all, test_fraction, split_seed)
    enc = Encoder(columns).fit(frame.iloc[train], where)
    x_all = enc.transform(frame)
    t = torch.from_numpy
    ds = Dataset(name, t(x_all[train]), t(y_all[train]), t(x_all[test]), t(y_all[test]), classes or names,
                 silo_train=t(silo_all[train]) if silo else None, silo_test=t(silo_all[test]) if silo else None,
                 silos=silo_names)
    return ds, enc


@DATASETS.register("tabular")
def tabular(path: str, label: str, silo: str | None = None, features: Sequence[str] | None = None,
            categorical: Sequence[str] = (), positive: Any = None, test_fraction: float = 0.2) -> Dataset:
    """Your own CSV or Parquet file: binary label, optional silo (bank) column, scaled and one-hot features."""
    frame = read_table(path)
    ds, _ = from_frame(frame, name=f"tabular:{Path(path).name}", label=label, silo=silo, features=features,
                       categorical=categorical, positive=positive, test_fraction=test_fraction,
                       where=str(path))
    return ds


# ---------------------------------------------------------------- loading from a DataConfig

_MEMO: dict[str, Dataset] = {}


def dataset_params(d) -> dict[str, Any]:
    """The factory parameters a DataConfig gives its dataset (the tabular fields, or ``params``)."""
    if d.dataset == "tabular":
        out = {"path": d.path, "label": d.label, "silo": d.silo, "features": d.features,
               "categorical": list(d.categorical), "positive": d.positive, "test_fraction": d.test_fraction}
        return {k: v for k, v in out.items() if v is not None}
    return dict(d.params)


def load_configured(d) -> Dataset:
    """The dataset a ``DataConfig`` names, built once per process for each set of parameters (a file is
    read again when its size or modification time changed)."""
    params = dataset_params(d)
    if not params:
        return load_dataset(d.dataset)
    stamp = None
    if d.dataset == "tabular" and Path(d.path).is_file():
        st = Path(d.path).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    key = json.dumps([d.dataset, params, stamp], sort_keys=True, default=str)
    if key not in _MEMO:
        _MEMO[key] = DATASETS.build(d.dataset, **params)
    return _MEMO[key]
