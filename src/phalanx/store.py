"""SQLite results store: runs, per-round metrics, per-client per-round rows, and events.

One file holds many runs; it can be reopened and appended to (also from parallel worker
processes: WAL mode and a busy timeout). A run is read back with ``read_run``.
"""

from __future__ import annotations

import json
import math
import platform
import sqlite3
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .errors import PhalanxError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT, config TEXT NOT NULL, versions TEXT, seed INTEGER,
    started REAL, ended REAL, status TEXT, final TEXT, cell TEXT);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, accuracy REAL, loss REAL, seconds REAL,
    metrics TEXT, PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS clients (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, client_id TEXT NOT NULL, malicious INTEGER,
    norm REAL, weight REAL, cosine REAL, flags TEXT, extra TEXT,
    PRIMARY KEY (run_id, round, client_id));
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL, round INTEGER, kind TEXT NOT NULL, detail TEXT, at REAL);
CREATE INDEX IF NOT EXISTS runs_cell ON runs(cell);
"""

PACKAGES = ("phalanx", "torch", "numpy", "pydantic", "cryptography", "opacus", "scikit-learn", "flwr")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


_PLAIN = {str, int, bool, type(None)}
_CLIENT_COLUMNS = {"client_id", "malicious", "norm", "weight", "cosine", "flags"}


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become None, tensors become lists."""
    kind = type(value)
    if kind is float:  # the common cases first: a store writes a row per client per round
        return value if math.isfinite(value) else None
    if kind in _PLAIN:
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(_clean(value), sort_keys=True)


@dataclass
class RunRecord:
    run_id: str
    name: str
    config: dict
    versions: dict
    seed: int
    started: float
    ended: float | None
    status: str
    final: dict
    rounds: list[dict]
    cell: str | None = None


class Store:
    """A results database. ``Store(path)`` creates or reopens it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL: no fsync per commit (a power cut may lose the last rounds,
            # never corrupt the store); a distributed-SGD run commits twice per round
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise PhalanxError(f"{self.path}: not a phalanx results store ({e})") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- writing
    def start_run(self, config: dict, name: str = "", seed: int = 0, run_id: str | None = None,
                  cell: str | None = None) -> str:
        run_id = run_id or uuid.uuid4().hex[:12]
        self.db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (run_id, name, dumps(config), dumps(package_versions()), seed, time.time(),
                         None, "running", "{}", cell))
        return run_id

    def log_round(self, run_id: str, rnd: int, metrics: dict[str, Any]) -> None:
        m = _clean(metrics)
        self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?)",
                        (run_id, rnd, m.get("accuracy"), m.get("loss"), m.get("seconds"), dumps(m)))

    def log_clients(self, run_id: str, rnd: int, rows: Iterable[dict[str, Any]]) -> None:
        vals = []
        for r in rows:
            r = _clean(r)
            extra = {k: v for k, v in r.items() if k not in _CLIENT_COLUMNS}  # cleaned already
            vals.append((run_id, rnd, str(r["client_id"]), int(bool(r.get("malicious"))), r.get("norm"),
                         r.get("weight"), r.get("cosine"), ",".join(r.get("flags") or []),
                         json.dumps(extra, sort_keys=True)))
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO clients VALUES (?,?,?,?,?,?,?,?,?)", vals)
        self.db.execute("COMMIT")

    def log_event(self, run_id: str, rnd: int | None, kind: str, detail: dict | None = None) -> None:
        self.db.execute("INSERT INTO events VALUES (?,?,?,?,?)",
                        (run_id, rnd, kind, dumps(detail or {}), time.time()))

    def finish_run(self, run_id: str, final: dict[str, Any], status: str = "done") -> None:
        self.db.execute("UPDATE runs SET ended=?, status=?, final=? WHERE run_id=?",
                        (time.time(), status, dumps(final), run_id))

    def reopen_run(self, run_id: str) -> None:
        """Mark a run 'running' again (it resumes from a checkpoint)."""
        self.db.execute("UPDATE runs SET ended=NULL, status='running' WHERE run_id=?", (run_id,))

    def truncate_after(self, run_id: str, rnd: int) -> None:
        """Forget rounds after ``rnd`` (used when a run resumes from a checkpoint)."""
        self.db.execute("DELETE FROM rounds WHERE run_id=? AND round>?", (run_id, rnd))
        self.db.execute("DELETE FROM clients WHERE run_id=? AND round>?", (run_id, rnd))

    # ---------------------------------------------------------------- reading
    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT run_id, name, seed, started, ended, status, final, cell FROM runs"
        args: tuple = ()
        if status:
            q, args = q + " WHERE status=?", (status,)
        rows = self.db.execute(q + " ORDER BY started", args).fetchall()
        keys = ("run_id", "name", "seed", "started", "ended", "status", "final", "cell")
        out = [dict(zip(keys, r)) for r in rows]
        for r in out:
            r["final"] = json.loads(r["final"] or "{}")
        return out

    def done_cells(self) -> set[str]:
        rows = self.db.execute("SELECT cell FROM runs WHERE status='done' AND cell IS NOT NULL")
        return {r[0] for r in rows}

    def read_run(self, run_id: str) -> RunRecord:
        row = self.db.execute("SELECT run_id, name, config, versions, seed, started, ended, status, "
                              "final, cell FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise PhalanxError(f"{self.path}: no run with id {run_id!r}")
        rounds = [json.loads(m) | {"round": r} for r, m in self.db.execute(
            "SELECT round, metrics FROM rounds WHERE run_id=? ORDER BY round", (run_id,))]
        return RunRecord(row[0], row[1], json.loads(row[2]), json.loads(row[3] or "{}"), row[4],
                         row[5], row[6], row[7], json.loads(row[8] or "{}"), rounds, row[9])

    def client_rows(self, run_id: str) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT round, client_id, malicious, norm, weight, cosine, flags, extra "
                              "FROM clients WHERE run_id=? ORDER BY round, client_id", (run_id,))
        out = []
        for rnd, cid, mal, norm, weight, cos, flags, extra in cur:
            out.append({"round": rnd, "client_id": cid, "malicious": bool(mal), "norm": norm,
                        "weight": weight, "cosine": cos, "flags": [f for f in (flags or "").split(",") if f],
                        **json.loads(extra or "{}")})
        return out

    def events(self, run_id: str) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT round, kind, detail FROM events WHERE run_id=? ORDER BY at", (run_id,))
        return [{"round": r, "kind": k, **json.loads(d or "{}")} for r, k, d in cur]
