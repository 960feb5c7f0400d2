"""Grid cells as Ray tasks, for grids larger than one machine: ``phalanx bench GRID --ray [ADDRESS]``.

The driver (the ``phalanx bench`` process) expands the grid, claims cells in its SQLite store
exactly as the local process pool does (:class:`phalanx.bench.Claims`), and submits each claimed
cell as a Ray task, keeping as many in flight as the cluster has CPUs (or ``--workers``). A task
may run on another machine, so it cannot write to the driver's store: it runs the cell into a
private in-memory store of its own (the same :class:`phalanx.store.Store` code that a local run
writes through) and returns that store's rows, table by table (the run, its rounds, its clients'
rows, its events). The driver writes them into its store in one transaction, so a cell is
either wholly in the store, 'done' or 'failed', or not there at all. The leakage audit's probes
are Ray tasks too; they already return their results to the driver.

Resume and ``--redo`` behave as with the local pool: what is done in the store is skipped, and a
cell whose task never came back (Ctrl-C, a lost node) runs again on the next invocation. Ctrl-C
(or SIGTERM) cancels every task still pending or running (a running one gets a KeyboardInterrupt,
then is killed if it has not stopped within ``CANCEL_GRACE`` seconds) and releases the claims.
Leaving Ray is bounded too: ``ray.shutdown()`` waits on the head (its GCS and raylet) without a
deadline of its own, so the driver gives it ``SHUTDOWN_GRACE`` seconds and then goes on without it
(the head ends the driver's job, and kills its workers, when the driver's process exits). Ctrl-C
thus ends ``phalanx bench --ray`` within about ``CANCEL_GRACE + SHUTDOWN_GRACE`` seconds however
loaded or stuck the head is.

Ray is optional: this module imports it only when a grid runs with ``--ray``.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from typing import Any

from .bench import Cell, Claims, GridOutcome, _init_worker, feed_cells, finish, run_cell
from .bench_privacy import run_probe
from .errors import PhalanxError
from .store import Store

__all__ = ["CANCEL_GRACE", "INSTALL_HINT", "SHUTDOWN_GRACE", "capture_cell", "load_rows", "run_on_ray"]

INSTALL_HINT = "pip install 'phalanx[ray]'"
CANCEL_GRACE = 20.0  # seconds a cancelled task gets to stop before its worker is killed
SHUTDOWN_GRACE = 5.0  # seconds ray.shutdown() gets before the driver leaves without it (it takes < 1 s)
TABLES = ("runs", "rounds", "clients", "events")


def import_ray():
    """The ``ray`` module, or a PhalanxError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise PhalanxError(f"--ray needs Ray, which is not installed: {INSTALL_HINT} "
                           "(the same Ray version on the driver and on every node of the cluster)") from None
    return ray


# ---------------------------------------------------------------- the task side


def dump_rows(store: Store) -> dict[str, dict[str, list]]:
    """Every row of the store's run tables: table -> {"columns": [...], "rows": [[...], ...]}."""
    out = {}
    for table in TABLES:
        cur = store.db.execute(f"SELECT * FROM {table}")  # noqa: S608 (fixed table names)
        out[table] = {"columns": [d[0] for d in cur.description], "rows": [list(r) for r in cur]}
    return out


def capture_cell(key: str, config: dict) -> dict[str, Any]:
    """Run one cell into a private in-memory store; return :func:`phalanx.bench.run_cell`'s result
    with the store's rows under ``"rows"`` (for :func:`load_rows` on the driver)."""
    _init_worker()  # one torch thread: a task holds one CPU
    store = Store(":memory:")
    try:
        res = run_cell(key, config, store)
        res["rows"] = dump_rows(store)
    finally:
        store.close()
    return res


# ---------------------------------------------------------------- the driver side


def load_rows(store: Store, rows: dict[str, dict[str, list]]) -> None:
    """Write the rows of :func:`dump_rows` into ``store``, all tables in one transaction."""
    db = store.db
    db.execute("BEGIN IMMEDIATE")
    try:
        for table in TABLES:
            part = rows.get(table)
            if not part or not part["rows"]:
                continue
            cols = part["columns"]
            verb = "INSERT" if table == "events" else "INSERT OR REPLACE"  # events have no key
            db.executemany(f"{verb} INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                           part["rows"])
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _connect(ray, address: str | None) -> bool:
    """Connect to the cluster at ``address`` (None or '': Ray's default, see the README); return
    whether this call started Ray (and so must shut it down)."""
    if ray.is_initialized():  # a notebook or a test that set Ray up itself
        return False
    _check_reachable(address)
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        with warnings.catch_warnings():  # Ray's tip about GPU env vars: phalanx trains on CPUs
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    except Exception as e:  # no cluster at that address, a local one that failed to start
        where = f"the Ray cluster at {address}" if address else "Ray (no address: RAY_ADDRESS, this machine's, or a new one)"
        raise PhalanxError(f"--ray: cannot start or reach {where}: {type(e).__name__}: {e}") from None
    finally:
        if main and sigterm is not None:  # ray.init makes SIGTERM a sys.exit; the grid's handler interrupts it
            signal.signal(signal.SIGTERM, sigterm)
    return True


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Fail at once when nothing listens at an explicit ``host:port`` (or ``ray://host:port``):
    Ray itself retries for minutes, deaf to Ctrl-C."""
    import socket

    host, sep, port = (address or "").removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # '', 'auto', 'local': Ray finds the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise PhalanxError(f"--ray {address}: nothing answers there ({e}); give the head's address "
                           "(HOST:6379 from a node of the cluster, ray://HOST:10001 from outside)") from None


def run_on_ray(out: GridOutcome, store: Store, todo: list[tuple[Cell, bool]], probes: list, pdict: dict,
               address: str | None, slots: int | None, progress: Any, claims: Claims, held: list[str]) -> None:
    """Run ``todo`` (cells, each with its redo flag) and ``probes`` as Ray tasks; see the module doc."""
    ray = import_ray()
    started = _connect(ray, address)
    pending: dict[Any, tuple[str, Any]] = {}  # object ref -> ("cell", Cell) or ("probe", (rule, seed))
    try:
        cell_task = ray.remote(num_cpus=1, max_retries=0)(capture_cell)
        probe_task = ray.remote(num_cpus=1, max_retries=0)(run_probe)
        slots = slots or max(1, int(ray.cluster_resources().get("CPU", 1)))
        for key, rule, seed in probes:
            pending[probe_task.remote(key, rule, seed, pdict)] = ("probe", (rule, seed))
        waiting = list(todo)

        def feed() -> None:
            feed_cells(waiting, pending, slots, lambda c: cell_task.remote(c.key, c.config), claims, held, out,
                       progress)

        feed()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                kind, item = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # the task's worker or node died
                    res = {"status": "failed", "error": f"Ray task died: {type(e).__name__}: {e}", "probe": ""}
                if kind == "cell" and "rows" in res:
                    load_rows(store, res.pop("rows"))
                finish(out, store, kind, item, res, progress, claims, held)
            feed()
    except BaseException:  # Ctrl-C, SIGTERM, or an error in the driver: no task outlives the grid
        cancel(ray, list(pending))
        raise
    finally:
        if started:
            out.ray_left = True  # until ray.shutdown() returns (a second Ctrl-C may cut the wait short)
            out.ray_left = not shutdown(ray)


def cancel(ray, refs: list, grace: float = CANCEL_GRACE) -> None:
    """Cancel ``refs`` (a KeyboardInterrupt in those running), wait up to ``grace`` seconds for them
    to end, then kill the workers of those still running. Every call here returns at once or within
    its timeout, whatever state the cluster is in."""
    for ref in refs:
        ray.cancel(ref)
    deadline = time.monotonic() + grace
    left = refs
    while left and time.monotonic() < deadline:
        _, left = ray.wait(left, num_returns=len(left), timeout=min(1.0, max(0.0, deadline - time.monotonic())))
    for ref in left:
        ray.cancel(ref, force=True)


def shutdown(ray, grace: float = SHUTDOWN_GRACE) -> bool:
    """``ray.shutdown()``, waited for at most ``grace`` seconds; return whether it finished.

    It talks to the head (unsubscribes from the GCS, disconnects from the raylet) with no deadline:
    on a loaded machine, or with a head that hangs, it can block for minutes, and Ctrl-C with it.
    So it runs in a daemon thread; past the grace the driver goes on without it, and without Ray's
    exit hook (a second ``ray.shutdown()`` that would wait again). The process should then end
    with ``os._exit`` (as ``phalanx bench`` does): finalizing the interpreter under the running
    shutdown can crash. The head notices the process exit, ends the driver's job and kills its
    workers: no task outlives the driver either way."""
    import atexit

    done = threading.Event()

    def run() -> None:
        try:
            ray.shutdown()
        finally:
            done.set()

    threading.Thread(target=run, name="phalanx-ray-shutdown", daemon=True).start()
    try:
        done.wait(grace)
    finally:  # also when a second Ctrl-C cut the wait short
        if not done.is_set():
            atexit.unregister(ray.shutdown)
            warnings.warn(f"Ray did not disconnect within {grace:g} s (a loaded or unresponsive head); "
                          "leaving without it: the cluster ends this driver's tasks when it exits",
                          RuntimeWarning, stacklevel=2)
    return done.is_set()
