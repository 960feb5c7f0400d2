"""Export a results store's tables as CSV or JSON files: runs, rounds, clients and events.

``export_store(db, out, "csv")`` writes ``runs.csv``, ``rounds.csv``, ``clients.csv`` and
``events.csv`` into ``out``. In CSV, nested values are flattened: a run's final metrics become
``final_<metric>`` columns, a round's metrics one column each, a client row's per-stage scores one
column each, and the config, versions and event details a JSON text column. In JSON, each table is
a list of objects with the nested values kept as objects. Rows are written as they are read, so a
large store does not need to fit in memory twice.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from .errors import PhalanxError
from .store import Store

FORMATS = ("csv", "json")
TABLES = ("runs", "rounds", "clients", "events")


def _runs(store: Store) -> Iterator[dict[str, Any]]:
    q = "SELECT run_id, name, seed, status, started, ended, cell, config, versions, final FROM runs ORDER BY started"
    for run_id, name, seed, status, started, ended, cell, config, versions, final in store.db.execute(q):
        yield {"run_id": run_id, "name": name, "seed": seed, "status": status, "started": started, "ended": ended,
               "cell": cell, "config": json.loads(config or "{}"), "versions": json.loads(versions or "{}"),
               "final": json.loads(final or "{}")}


def _rounds(store: Store) -> Iterator[dict[str, Any]]:
    for run_id, rnd, metrics in store.db.execute("SELECT run_id, round, metrics FROM rounds ORDER BY run_id, round"):
        yield {"run_id": run_id, "round": rnd, **json.loads(metrics or "{}")}


def _clients(store: Store) -> Iterator[dict[str, Any]]:
    q = ("SELECT run_id, round, client_id, malicious, norm, weight, cosine, flags, extra FROM clients "
         "ORDER BY run_id, round, client_id")
    for run_id, rnd, cid, mal, norm, weight, cos, flags, extra in store.db.execute(q):
        yield {"run_id": run_id, "round": rnd, "client_id": cid, "malicious": bool(mal), "norm": norm,
               "weight": weight, "cosine": cos, "flags": [f for f in (flags or "").split(",") if f],
               **json.loads(extra or "{}")}


def _events(store: Store) -> Iterator[dict[str, Any]]:
    for run_id, rnd, kind, detail, at in store.db.execute("SELECT run_id, round, kind, detail, at FROM events "
                                                          "ORDER BY at"):
        yield {"run_id": run_id, "round": rnd, "kind": kind, "at": at, "detail": json.loads(detail or "{}")}


READERS = {"runs": _runs, "rounds": _rounds, "clients": _clients, "events": _events}


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row: final metrics spread into final_<k> columns, lists joined, other nesting as JSON."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k == "final" and isinstance(v, dict):
            out.update({f"final_{m}": x if not isinstance(x, (dict, list)) else json.dumps(x) for m, x in v.items()})
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[k] = ";".join(v)
        elif isinstance(v, (dict, list)):
            out[k] = json.dumps(v, sort_keys=True)
        else:
            out[k] = v
    return out


def _columns(store: Store, table: str) -> list[str]:
    """Every column a table's CSV needs (a first pass over its rows: metric keys vary by run)."""
    cols: dict[str, None] = {}
    for row in READERS[table](store):
        cols.update(dict.fromkeys(_flat(row)))
    return list(cols)


def export_store(db: str | Path, out: str | Path, fmt: str = "csv") -> dict[str, tuple[Path, int]]:
    """Write every table of the store at ``db`` into ``out`` as ``fmt``; {table: (file, rows)}."""
    if fmt not in FORMATS:
        raise PhalanxError(f"export: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not Path(db).is_file():
        raise PhalanxError(f"export: no results store at {db}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(db)
    written = {}
    try:
        for table in TABLES:
            path, n = out / f"{table}.{fmt}", 0
            with open(path, "w", newline="", encoding="utf-8") as fh:
                if fmt == "csv":
                    writer = csv.DictWriter(fh, fieldnames=_columns(store, table), restval="")
                    writer.writeheader()
                    for row in READERS[table](store):
                        writer.writerow({k: "" if v is None else v for k, v in _flat(row).items()})
                        n += 1
                else:
                    fh.write("[")
                    for row in READERS[table](store):
                        fh.write(("," if n else "") + "\n" + json.dumps(row, sort_keys=True))
                        n += 1
                    fh.write("\n]\n")
            written[table] = (path, n)
    finally:
        store.close()
    return written
