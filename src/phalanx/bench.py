"""Attack x defense grids: expand a YAML spec into cells, run them in parallel, resumably.

A grid is ``base`` (an experiment config) crossed with the axes ``datasets``, ``partitions``,
``byzantine`` fractions, ``attacks`` (label -> family + attack block), ``defenses`` (label ->
stages, optionally with federation overrides) and ``seeds``. A cell's key is a hash of its
resolved config (fields at their defaults and the name left out), so a cell already stored with
status 'done' is skipped and an interrupted grid resumes where it stopped. A clean entry
(``family: none``) is added when the grid has none: it is the reference for the report's ticks.

The spec itself is read and validated by :mod:`phalanx.bench_spec`.

Workers are 'spawn' processes with one torch thread each; every worker writes its runs to the
same SQLite store (WAL mode, busy timeout). The grid's layout is kept in the ``bench_grids`` and
``bench_cells`` tables, and the optional leakage audit (``privacy``) in ``bench_privacy`` and
``bench_privacy_map`` (see :mod:`phalanx.bench_privacy`); :mod:`phalanx.report` makes the tables
and plots.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .bench_privacy import plan_privacy, run_probe, store_probe
from .bench_spec import GridSpec, PartitionSpec, load_grid, parse_grid
from .config import parse_config
from .errors import ConfigError, PhalanxError
from .store import Store

__all__ = ["Cell", "GridOutcome", "cell_key", "expand", "load_grid", "parse_grid", "run_cell", "run_grid"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_grids (grid TEXT PRIMARY KEY, spec TEXT NOT NULL, updated REAL);
CREATE TABLE IF NOT EXISTS bench_cells (
    grid TEXT NOT NULL, dataset TEXT, partition TEXT, byzantine REAL, attack TEXT, family TEXT,
    defense TEXT, seed INTEGER, cell TEXT NOT NULL,
    PRIMARY KEY (grid, dataset, partition, byzantine, attack, defense, seed));
CREATE TABLE IF NOT EXISTS bench_privacy (
    probe TEXT PRIMARY KEY, rule TEXT, seed INTEGER, psnr REAL, ssim REAL, label_acc REAL,
    seconds REAL, at REAL);
CREATE TABLE IF NOT EXISTS bench_claims (
    cell TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT, pid INTEGER, at REAL);
CREATE TABLE IF NOT EXISTS bench_privacy_map (
    grid TEXT NOT NULL, defense TEXT NOT NULL, seed INTEGER NOT NULL, probe TEXT NOT NULL,
    PRIMARY KEY (grid, defense, seed));
"""


# ---------------------------------------------------------------- expansion


@dataclass
class Cell:
    key: str
    config: dict[str, Any]
    coords: dict[str, Any]
    rounds: int

    @property
    def label(self) -> str:
        c = self.coords
        return (f"{c['attack']} x {c['defense']} (seed {c['seed']}, {c['dataset']}, {c['partition']}, "
                f"byz {c['byzantine']:g})")


def cell_key(cfg) -> str:
    """A stable hash of a resolved ExperimentConfig (its name, plug-ins and default-valued fields left out)."""
    body = cfg.model_dump(mode="json", exclude_defaults=True)
    body.pop("name", None)
    body.pop("plugins", None)  # where the user's modules live is not part of a cell's identity
    return "c" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _merge(node: dict, path: str, updates: dict) -> None:
    sub = node.setdefault(path, {})
    if not isinstance(sub, dict):
        raise ConfigError(f"base.{path}: expected a mapping, got {sub!r}")
    sub.update(updates)


def expand(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid, in axis order (datasets, partitions, byzantine, attacks, defenses, seeds)."""
    base = spec.base
    data = base.get("data", {}) if isinstance(base.get("data"), dict) else {}
    datasets = spec.datasets or [data.get("dataset", "fashion-mnist")]
    partitions = spec.partitions or [
        PartitionSpec(**{k: v for k, v in data.items() if k in PartitionSpec.model_fields})]
    fractions = spec.byzantine or [base.get("attack", {}).get("byzantine", 0.0)]
    cells, seen = [], set()
    for ds, part, byz, (alabel, a), (dlabel, dname, guess), seed in itertools.product(
            datasets, partitions, fractions, spec.attacks.items(), defense_rows(spec), spec.seeds):
        d = spec.defenses[dname]
        coords = {"dataset": ds, "partition": part.label(), "byzantine": float(byz), "attack": alabel,
                  "family": a.family, "defense": dlabel, "seed": seed}
        if tuple(coords.values()) in seen:
            continue
        seen.add(tuple(coords.values()))
        raw = copy.deepcopy(base)
        _merge(raw, "data", {"dataset": ds, **part.model_dump(exclude_none=True)})
        _merge(raw, "federation", {**d.federation, **a.federation})
        raw.update(attack={**a.model_dump(exclude={"family", "federation"}), "byzantine": byz},
                   defense=copy.deepcopy(d.stages), seed=seed, name=f"{spec.name}/{alabel}/{dlabel}/s{seed}")
        if guess is not None:
            raw["defense_f"] = guess
        try:
            cfg = parse_config(raw)
        except ConfigError as e:
            raise ConfigError(f"cell attack={alabel}, defense={dlabel}: {e}") from None
        cells.append(Cell(cell_key(cfg), cfg.model_dump(mode="json"), coords, cfg.federation.rounds))
    _check_buildable(cells)
    return cells


def uses_f(stages: list) -> bool:
    """Does any stage of this defense take the server's f (a guess of the Byzantine count)?"""
    from .defenses.pipeline import build_defense

    try:
        pipe = build_defense(copy.deepcopy(stages), f=1, **_signing_inject())
    except PhalanxError:
        return True  # _check_buildable names the problem
    return any(getattr(stage, "f", None) is not None for stage in pipe.stages)


def defense_rows(spec: GridSpec) -> list[tuple[str, str, Any]]:
    """(row label, defense label, f guess or None) for each row of the grid's defenses."""
    guesses = spec.defense_f or [None]
    rows = []
    for dlabel, d in spec.defenses.items():
        if len(guesses) > 1 and uses_f(d.stages):
            rows += [(f"{dlabel} f={g}", dlabel, g) for g in guesses]
        else:
            rows.append((dlabel, dlabel, guesses[0]))
    return rows


def _signing_inject() -> dict[str, Any]:
    from .defenses.signing import KeyRegistry

    return {"registry": KeyRegistry(), "run_id": "check"}


def _check_buildable(cells: list[Cell]) -> None:
    """Build each distinct attack and defense once, so a bad parameter fails before any cell runs."""
    from .defenses.pipeline import build_defense
    from .registry import ATTACKS

    done: set[str] = set()
    for c in cells:
        cfg = c.config
        probe = json.dumps([cfg["attack"]["name"], cfg["attack"]["params"], cfg["defense"],
                            cfg["federation"].get("signing")], sort_keys=True)
        if probe in done:
            continue
        done.add(probe)
        try:
            if cfg["attack"]["name"]:
                ATTACKS.build(cfg["attack"]["name"], **cfg["attack"]["params"])
            build_defense(cfg["defense"], f=0, **(_signing_inject() if cfg["federation"].get("signing") else {}))
        except PhalanxError as e:
            raise ConfigError(f"cell attack={c.coords['attack']}, defense={c.coords['defense']}: {e}") from None


# ---------------------------------------------------------------- running


_QUEUE: Any = None  # a worker's channel for per-round progress (set by the pool's initializer)


def _init_worker(queue: Any = None) -> None:
    import torch

    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(1)


_STORES: dict[str, Store] = {}


def run_cell(key: str, config: dict, db: str | Store, notify: Callable | None = None) -> dict[str, Any]:
    """Run one cell and store it (status 'done', or 'failed' with the error) in ``db`` (a path, or
    an open Store: a Ray task's private one). Never raises on bad input."""
    import phalanx  # noqa: F401  (registers everything in a fresh worker)

    from .federation import Federation

    store = db if isinstance(db, Store) else (_STORES.get(db) or _STORES.setdefault(db, Store(db)))
    notify = notify or (_QUEUE.put if _QUEUE is not None else None)
    t0, fed = time.perf_counter(), None
    try:
        fed = Federation(parse_config(config))
        final = fed.run(store, cell=key, on_round=(lambda res: notify(key)) if notify else None)
        return {"key": key, "status": "done", "final": final, "seconds": time.perf_counter() - t0}
    except Exception as e:  # one failed cell is recorded and the grid goes on
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, PhalanxError) else str(e)
        if fed is not None and getattr(fed, "run_id", None):
            store.finish_run(fed.run_id, {"error": msg}, status="failed")
        return {"key": key, "status": "failed", "error": msg, "seconds": time.perf_counter() - t0}


@dataclass
class GridOutcome:
    total: int = 0
    skipped: int = 0
    ran: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    probes: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    ray_left: bool = False  # Ray's shutdown hung on the head and was left running (see bench_ray.shutdown)


def record_layout(store: Store, spec: GridSpec, cells: list[Cell]) -> None:
    """Write the grid's spec and cell coordinates (replacing a previous layout of the same grid)."""
    db = store.db
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    db.execute("INSERT OR REPLACE INTO bench_grids VALUES (?,?,?)",
               (spec.name, json.dumps(spec.model_dump(mode="json")), time.time()))
    db.execute("DELETE FROM bench_cells WHERE grid=?", (spec.name,))
    db.executemany("INSERT OR REPLACE INTO bench_cells VALUES (?,?,?,?,?,?,?,?,?)",
                   [(spec.name, *c.coords.values(), c.key) for c in cells])
    db.execute("COMMIT")


class Claims:
    """Cells claimed atomically in the store, so that several ``bench`` processes on one database
    split the work instead of each running every cell. A claim whose owner process is gone (killed)
    is stale: the cell is claimed again and its run left 'running' is marked 'interrupted'."""

    def __init__(self, store: Store, since: float):
        import os
        import socket
        import uuid

        self.db, self.since = store.db, since
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"

    def _alive(self, host: str, pid: int) -> bool:
        import os

        if host != self.host:
            return True  # another machine's claim: trust it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def take(self, key: str, again: bool) -> bool:
        """Claim ``key`` unless another live process holds it, or it is done (since this grid began
        when ``again``: a redo by two processes still runs once)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT owner, host, pid FROM bench_claims WHERE cell=?", (key,)).fetchone()
            if row is not None and row[0] != self.owner and self._alive(row[1], row[2]):
                db.execute("ROLLBACK")
                return False
            since = self.since if again else 0.0
            if db.execute("SELECT 1 FROM runs WHERE cell=? AND status='done' AND ended>=?", (key, since)).fetchone():
                db.execute("ROLLBACK")
                return False
            db.execute("UPDATE runs SET status='interrupted' WHERE cell=? AND status='running'", (key,))
            db.execute("INSERT OR REPLACE INTO bench_claims VALUES (?,?,?,?,?)",
                       (key, self.owner, self.host, self.pid, time.time()))
            db.execute("COMMIT")
            return True
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def release(self, keys: Sequence[str], interrupted: bool = False) -> None:
        """Drop our claims on ``keys``; with ``interrupted``, their runs still 'running' say so."""
        for key in keys:
            if interrupted:
                self.db.execute("UPDATE runs SET status='interrupted', ended=? WHERE cell=? AND status='running'",
                                (time.time(), key))
            self.db.execute("DELETE FROM bench_claims WHERE cell=? AND owner=?", (key, self.owner))


def _matches(cell: Cell, pattern: str) -> bool:
    """Does ``attack/defense`` of the cell match the glob ``pattern``?"""
    return fnmatch.fnmatchcase(f"{cell.coords['attack']}/{cell.coords['defense']}", pattern)


def run_grid(spec: GridSpec, db: str | Path, workers: int | None = None, limit: int | None = None,
             progress: Any = None, redo: Sequence[str] = (), ray: str | None = None) -> GridOutcome:
    """Run the cells of ``spec`` not yet done in ``db`` (at most ``limit``), then the leakage audit.

    redo: glob patterns on ``attack/defense`` (``fang_krum/*``); matching cells run again even when
    done, say after a code change. Their older runs stay in the store; reports use the newest.

    ray: None runs the cells here (a pool of ``workers`` processes); a string runs them as Ray tasks
    on the cluster at that address ('' for Ray's default), at most ``workers`` at a time (default:
    the cluster's CPUs), with results written here (see :mod:`phalanx.bench_ray`).

    progress: None, or an object with ``start(cells, probes)``, ``advance(cell_key)`` (one round
    done), ``cell_done(cell, result)`` and ``probe_done()`` (the CLI passes a rich progress bar).
    """
    t0 = time.perf_counter()
    cells = expand(spec)
    for p in redo:
        if not any(_matches(c, p) for c in cells):
            raise ConfigError(f"redo: {p!r} matches no cell; patterns are ATTACK/DEFENSE globs over attacks "
                              f"{', '.join(spec.attacks)} and defenses {', '.join(spec.defenses)}")
    store = Store(db)
    record_layout(store, spec, cells)
    claims = Claims(store, since=time.time())
    done = store.done_cells()
    todo, keys = [], set()
    for c in cells:
        again = any(_matches(c, p) for p in redo)
        if (again or c.key not in done) and c.key not in keys:
            keys.add(c.key)
            todo.append((c, again))
    out = GridOutcome(total=len(cells), skipped=len(cells) - len(todo))
    if limit is not None:
        todo = todo[:limit]
    probes = plan_privacy(store, spec) if limit is None else []
    slots, workers = workers, workers or spec.workers
    if progress:
        progress.start([c for c, _ in todo], len(probes))
    pdict = spec.privacy.model_dump() if spec.privacy else {}
    restore = sigterm_interrupts()
    held: list[str] = []  # the cells this process has claimed and not finished
    try:
        if ray is not None:
            from .bench_ray import run_on_ray

            run_on_ray(out, store, todo, probes, pdict, ray, slots, progress, claims, held)
        elif workers <= 1:
            _init_worker()
            for c, again in todo:
                if not claims.take(c.key, again):
                    _elsewhere(out, c, progress)
                    continue
                held.append(c.key)
                _collect(out, store, c, run_cell(c.key, c.config, str(db), _advancer(progress)), progress)
                claims.release([held.pop()])
            for key, rule, seed in probes:
                _probe_done(out, store, rule, seed, run_probe(key, rule, seed, pdict), progress)
        else:
            _run_parallel(out, store, todo, probes, pdict, str(db), workers, progress, claims, held)
    except KeyboardInterrupt:
        out.interrupted = True
    finally:
        claims.release(held, interrupted=True)
        restore()
        if str(db) in _STORES:  # the in-process worker's connection
            _STORES.pop(str(db)).close()
    out.seconds = time.perf_counter() - t0
    store.close()
    return out


def sigterm_interrupts() -> Callable[[], None]:
    """Treat SIGTERM like Ctrl-C while a grid runs, so ``kill`` stops the workers too instead of
    leaving them orphaned. Returns the function that puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _advancer(progress) -> Callable | None:
    return progress.advance if progress else None


def _collect(out: GridOutcome, store: Store, cell: Cell, res: dict, progress) -> None:
    if res["status"] == "done":
        out.ran += 1
    else:
        out.failed.append((cell.label, res.get("error", "")))
    if progress:
        progress.cell_done(cell, res)


def _probe_done(out: GridOutcome, store: Store, rule: list, seed: int, res: dict, progress) -> None:
    error = store_probe(store, rule, seed, res)
    if error is None:
        out.probes += 1
    else:
        out.failed.append((f"privacy probe {json.dumps(rule)} seed {seed}", error))
    if progress:
        progress.probe_done()


def _elsewhere(out: GridOutcome, cell: Cell, progress) -> None:
    """Another process claimed the cell (or finished it meanwhile): this one leaves it."""
    out.skipped += 1
    if progress:
        progress.cell_done(cell, {"status": "elsewhere"})


def feed_cells(waiting: list, pending: dict, slots: int, submit: Callable, claims: Claims, held: list[str],
               out: GridOutcome, progress) -> None:
    """Claim the next cells of ``waiting`` and ``submit`` them (handle -> ("cell", cell) in
    ``pending``) while fewer than ``slots`` cells are in flight; a cell claimed elsewhere is left."""
    while waiting and sum(kind == "cell" for kind, _ in pending.values()) < slots:
        c, again = waiting.pop(0)
        if claims.take(c.key, again):
            held.append(c.key)
            pending[submit(c)] = ("cell", c)
        else:
            _elsewhere(out, c, progress)


def finish(out: GridOutcome, store: Store, kind: str, item: Any, res: dict, progress, claims: Claims,
           held: list[str]) -> None:
    """Count a finished cell (and release its claim) or store a finished probe."""
    if kind == "cell":
        _collect(out, store, item, res, progress)
        held.remove(item.key)
        claims.release([item.key])
    else:
        _probe_done(out, store, *item, res, progress)


def _run_parallel(out, store, todo, probes, pdict, db, workers, progress, claims, held) -> None:
    """Cells are claimed one at a time as a worker frees up, so parallel grids split the work."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue() if progress else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,))
    try:
        futures = {pool.submit(run_probe, key, rule, seed, pdict): ("probe", (rule, seed))
                   for key, rule, seed in probes}
        waiting = list(todo)

        def feed() -> None:
            feed_cells(waiting, futures, workers, lambda c: pool.submit(run_cell, c.key, c.config, db), claims, held,
                       out, progress)

        feed()
        while futures:
            finished, _ = wait(set(futures), timeout=0.25, return_when=FIRST_COMPLETED)
            _drain(queue, progress)
            for f in finished:
                kind, item = futures.pop(f)
                try:
                    res = f.result()
                except Exception as e:  # a worker died (out of memory, killed)
                    res = {"status": "failed", "error": f"worker died: {type(e).__name__}: {e}", "probe": ""}
                finish(out, store, kind, item, res, progress, claims, held)
            feed()
        _drain(queue, progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if queue is not None:
            queue.close()


def _drain(queue, progress) -> None:
    if queue is None:
        return
    import queue as q

    while True:
        try:
            progress.advance(queue.get_nowait())
        except q.Empty:
            return
