"""Two fraud-detection datasets: the public ULB credit-card data, and a seeded multi-bank generator.

``creditcard``: 284,807 card transactions by European cardholders over two days of September 2013,
492 of them fraudulent (0.17%): 28 PCA components V1..V28, Amount and (in some mirrors) Time;
Class 1 = fraud (Dal Pozzolo et al., CIDM 2015). It has no bank column, so it partitions iid or
dirichlet, not by silo.

The cache, ``<cache>/creditcard/`` (``phalanx.data.datasets.CACHE``):

* first use: fetched from OpenML (data id 1597) with scikit-learn's client, checked against the
  published counts (rows, frauds, columns), written as ``creditcard.parquet`` with its SHA-256 in
  ``creditcard.parquet.sha256``. The checksum is written before the Parquet file is moved into
  place, so an interrupted first use leaves no Parquet file and the next use fetches again.
* later uses: read from the cache, never fetched. A Parquet file whose checksum is missing or
  differs (truncated, corrupt, edited) is a ``DataError`` naming the file: it is not re-fetched
  behind the user's back; delete the file to fetch it again.
* a failed download (network, HTTP, parsing) or a table with the wrong counts is a ``DataError``
  naming OpenML dataset 1597, and leaves nothing in the cache.

``fraud-synth``: see :func:`synth_frame`.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..registry import DATASETS
from . import datasets as _datasets
from .datasets import Dataset
from .tabular import from_frame, read_table

OPENML_ID = 1597
EXPECTED = {"rows": 284_807, "frauds": 492}  # the published counts, checked after a fetch
CLASSES = ("legitimate", "fraud")


# ---------------------------------------------------------------- creditcard (OpenML 1597)


def _fetch_openml(data_home: Path):
    """The creditcard table as a pandas DataFrame, downloaded by scikit-learn's OpenML client."""
    from sklearn.datasets import fetch_openml

    return fetch_openml(data_id=OPENML_ID, data_home=str(data_home), as_frame=True, parser="auto").frame


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_creditcard(frame, where: str) -> None:
    needed = [f"V{i}" for i in range(1, 29)] + ["Amount", "Class"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: not the credit-card fraud table: missing column(s) {', '.join(missing)}")
    frauds = int((frame["Class"].astype(str).str.strip().isin(["1", "1.0", "True"])).sum())
    if len(frame) != EXPECTED["rows"] or frauds != EXPECTED["frauds"]:
        raise DataError(f"{where}: expected {EXPECTED['rows']} rows with {EXPECTED['frauds']} frauds, got "
                        f"{len(frame)} rows with {frauds} frauds (an incomplete or different download)")


def creditcard_file() -> Path:
    """The cached Parquet file of the creditcard data, fetched from OpenML and recorded on first use."""
    folder = Path(_datasets.CACHE) / "creditcard"
    path, digest = folder / "creditcard.parquet", folder / "creditcard.parquet.sha256"
    if path.is_file():
        if not digest.is_file():
            raise DataError(f"{path}: its recorded checksum {digest.name} is missing; delete the file to fetch "
                            f"it again")
        want = (digest.read_text().split() or [""])[0]
        if _sha256(path) != want:
            raise DataError(f"{path}: checksum mismatch with {digest.name} (the cached file is corrupt or was "
                            f"changed); delete it to fetch it again")
        return path
    folder.mkdir(parents=True, exist_ok=True)
    try:
        frame = _fetch_openml(folder / "openml")
    except DataError:
        raise
    except Exception as e:  # network, HTTP and parsing errors of the OpenML client
        raise DataError(f"creditcard: could not fetch OpenML dataset {OPENML_ID} ({type(e).__name__}: {e}); "
                        f"check the network, or use dataset 'tabular' with your own copy of creditcard.csv "
                        f"(label: Class)") from None
    _check_creditcard(frame, f"OpenML dataset {OPENML_ID}")
    frame = frame.copy()
    frame["Class"] = frame["Class"].astype(str).str.strip().isin(["1", "1.0", "True"]).astype("int64")
    tmp = path.with_suffix(".parquet.part")
    try:
        frame.to_parquet(tmp, index=False)
        digest.write_text(f"{_sha256(tmp)}  {path.name}\n")  # before the move: no Parquet without its checksum
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@DATASETS.register("creditcard")
def creditcard(test_fraction: float = 0.2) -> Dataset:
    """ULB credit-card fraud (OpenML 1597): 284,807 transactions, 492 frauds; fetched once into the cache."""
    path = creditcard_file()
    frame = read_table(path)
    _check_creditcard(frame, str(path))
    ds, _ = from_frame(frame, name="creditcard", label="Class", test_fraction=test_fraction, where=str(path),
                       classes=CLASSES)
    return ds


# ---------------------------------------------------------------- fraud-synth

PATTERNS = ("card_testing", "account_takeover", "skimming", "bust_out")
CHANNELS = ("pos", "contactless", "online", "atm")
LATENT = 12  # behavioural features b1..b12 (like the PCA components of the ULB data)
NOISE = 4  # session features s1..s4 with no fraud signal (real tables carry many such columns)


def synth_frame(banks: int = 8, rows: int = 120_000, seed: int = 0, min_rows: int = 3000,
                fraud_rate: tuple[float, float] = (0.001, 0.02), min_frauds: int = 20):
    """A seeded table of card transactions held by ``banks`` banks (a pandas DataFrame).

    What it models:

    * **Banks of different sizes.** A few large banks and several small ones: bank sizes are drawn
      log-uniformly over a 20x range (at least ``min_rows`` each) and scaled to ``rows`` in all.
    * **Different customers per bank (covariate shift).** Each bank has its own mean of the
      behavioural features, its own typical amount, transaction velocity, share of cross-border
      payments and mix of channels (point of sale, contactless, online, ATM).
    * **Rare fraud at different rates.** Each bank's fraud rate is drawn log-uniformly in
      ``fraud_rate`` (0.1%-2%, as reported across card issuers); a bank holds at least
      ``min_frauds`` frauds, so that both its training and test rows contain some.
    * **Shared fraud patterns, seen unevenly.** Fraud comes from four modus operandi that criminal
      groups run against many banks: card testing (many small online payments at night), account
      takeover (large online, often cross-border payments), skimming (ATM and point-of-sale
      withdrawals abroad, at night) and bust-out (a burst of large in-store purchases). Each has
      its own signature in the behavioural features. A bank's frauds follow its own mixture of the
      four (a Dirichlet(0.5) draw), so a small bank has seen few examples of most patterns: the
      case for learning them together.
    * **Overlap.** A fraud is a transaction of the bank's ordinary customers moved towards its
      pattern by a random strength in [0.3, 1.2]: weak frauds look legitimate, as in real data.
    * **Uninformative columns.** Four session features s1..s4 are the same for fraud and
      legitimate transactions.

    Columns: bank, channel (categorical), log_amount (log of 1 + amount in euros), hour (0-24),
    velocity (card's transactions in the last 24 h), foreign (bool), b1..b12, s1..s4, is_fraud.
    """
    import pandas as pd

    if not isinstance(banks, int) or isinstance(banks, bool) or banks < 1:
        raise DataError(f"fraud-synth: banks must be an integer >= 1, got {banks!r}")
    if rows < banks * min_rows:
        raise DataError(f"fraud-synth: rows must be >= banks * min_rows = {banks * min_rows}, got {rows}")
    lo, hi = fraud_rate
    if not 0 < lo <= hi < 0.5:
        raise DataError(f"fraud-synth: fraud_rate must be (low, high) with 0 < low <= high < 0.5, got {fraud_rate}")
    rng = np.random.default_rng([seed, 1597])
    weights = np.exp(rng.uniform(0, math.log(20), banks))
    sizes = np.maximum(min_rows, np.floor(weights / weights.sum() * rows)).astype(int)
    rates = np.exp(rng.uniform(math.log(lo), math.log(hi), banks))
    # the fraud patterns: behavioural signature (unit vector on a few features), amount, hour, channel, ...
    sig = np.zeros((len(PATTERNS), LATENT))
    for k in range(len(PATTERNS)):
        idx = rng.choice(LATENT, 4, replace=False)
        sig[k, idx] = rng.choice([-1.0, 1.0], 4) * rng.uniform(0.6, 1.0, 4)
        sig[k] *= 2.6 / np.linalg.norm(sig[k])
    # per pattern: (log-amount mean, hour mean, extra velocity, foreign prob, channel probabilities)
    profile = {
        "card_testing": (1.2, 2.0, 6.0, 0.3, (0.0, 0.05, 0.95, 0.0)),
        "account_takeover": (6.0, 21.0, 1.0, 0.6, (0.0, 0.0, 1.0, 0.0)),
        "skimming": (5.0, 1.0, 2.0, 0.8, (0.3, 0.0, 0.0, 0.7)),
        "bust_out": (6.5, 15.0, 4.0, 0.1, (0.7, 0.2, 0.1, 0.0)),
    }
    load = rng.normal(0, 0.5, (LATENT, 3))  # a customer-segment factor correlates the behavioural features
    frames = []
    for b in range(banks):
        n = int(sizes[b])
        nf = max(min_frauds, int(round(rates[b] * n)))
        shift = rng.normal(0, 0.35, LATENT)
        amount_mu, velocity_mu = rng.normal(3.4, 0.35), rng.uniform(1.5, 3.5)
        foreign_p, channels = rng.uniform(0.02, 0.10), rng.dirichlet(np.full(len(CHANNELS), 3.0))
        mix = rng.dirichlet(np.full(len(PATTERNS), 0.5))
        latent = shift + rng.normal(0, 1, (n, LATENT)) + rng.normal(0, 1, (n, 3)) @ load.T
        log_amount = rng.normal(amount_mu, 0.9, n)
        hour = np.mod(rng.normal(14.0, 3.5, n), 24.0)
        velocity = rng.poisson(velocity_mu, n).astype(float)
        foreign = rng.random(n) < foreign_p
        channel = rng.choice(len(CHANNELS), n, p=channels)
        y = np.zeros(n, dtype=np.int64)
        fraud = rng.choice(n, nf, replace=False)
        y[fraud] = 1
        kind = rng.choice(len(PATTERNS), nf, p=mix)
        strength = rng.uniform(0.3, 1.2, nf)
        for k, name in enumerate(PATTERNS):
            rows_k = fraud[kind == k]
            s = strength[kind == k]
            if not len(rows_k):
                continue
            amt, hr, vel, fp, ch = profile[name]
            latent[rows_k] += s[:, None] * sig[k]
            log_amount[rows_k] = (1 - s / 1.2) * log_amount[rows_k] + (s / 1.2) * rng.normal(amt, 0.6, len(rows_k))
            mixed_hour = rng.random(len(rows_k)) < s / 1.2
            hour[rows_k] = np.where(mixed_hour, np.mod(rng.normal(hr, 2.0, len(rows_k)), 24.0), hour[rows_k])
            velocity[rows_k] += rng.poisson(vel * s)
            foreign[rows_k] |= rng.random(len(rows_k)) < fp * s / 1.2
            own = rng.random(len(rows_k)) < s / 1.2
            channel[rows_k] = np.where(own, rng.choice(len(CHANNELS), len(rows_k), p=ch), channel[rows_k])
        cols = {"bank": f"bank{b}", "channel": np.asarray(CHANNELS)[channel],
                "log_amount": np.round(np.maximum(log_amount, 0.0), 4), "hour": np.round(hour, 2),
                "velocity": velocity, "foreign": foreign}
        cols.update({f"b{i + 1}": latent[:, i] for i in range(LATENT)})
        cols.update({f"s{i + 1}": rng.normal(0, 1, n) for i in range(NOISE)})
        cols["is_fraud"] = y
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


@DATASETS.register("fraud-synth")
def fraud_synth(banks: int = 8, rows: int = 120_000, seed: int = 0, min_rows: int = 3000,
                fraud_rate: tuple[float, float] = (0.001, 0.02), min_frauds: int = 20,
                test_fraction: float = 0.6) -> Dataset:
    """Seeded card transactions of several banks (8 by default): sizes, fraud rates 0.1-2%, customers and fraud patterns differ."""
    frame = synth_frame(banks, rows, seed, min_rows, tuple(fraud_rate), min_frauds)
    ds, _ = from_frame(frame, name="fraud-synth", label="is_fraud", silo="bank", categorical=["channel"],
                       test_fraction=test_fraction, where="fraud-synth", classes=CLASSES)
    return ds
