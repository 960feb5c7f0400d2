"""Grids on Ray (issue 14, item 6): a cell's rows travel back to the driver's store, a 4-cell grid run
through ``phalanx bench --ray`` on a local 2-CPU Ray head matches a local run, and Ray stays optional."""

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

from phalanx.bench import expand, parse_grid, run_grid
from phalanx.bench_ray import CANCEL_GRACE, SHUTDOWN_GRACE, capture_cell, load_rows, shutdown
from phalanx.errors import PhalanxError
from phalanx.store import Store

GRID = {  # 4 cells: (clean, sign flip) x (mean, median), one seed
    "name": "onray",
    "base": {"data": {"dataset": "digits"}, "model": {"name": "logreg"},
             "federation": {"num_clients": 6, "rounds": 3, "batch_size": 16, "lr": 0.1}},
    "byzantine": [0.34],
    "attacks": {"clean": {"family": "none"}, "sign": {"family": "random", "name": "sign_flip"}},
    "defenses": {"mean": ["mean"], "median": ["median"]},
    "seeds": [0],
}


def stored(db) -> dict:
    """cell -> [(status, final metrics, rounds without their timings, client rows, event kinds)], one per run."""
    store = Store(db)
    out = {}
    for r in store.runs():
        run = store.read_run(r["run_id"])
        rounds = [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in run.rounds]  # timings
        out.setdefault(r["cell"], []).append(
            (r["status"], r["final"], rounds, store.client_rows(r["run_id"]),
             [e["kind"] for e in store.events(r["run_id"])]))
    store.close()
    return out


def test_a_cells_rows_travel_back_to_the_drivers_store(tmp_path):
    """capture_cell (what a Ray task runs) + load_rows (what the driver does) store what a local run stores."""
    spec = parse_grid(GRID | {"defenses": {"mean": ["mean"]}})
    run_grid(spec, tmp_path / "local.db", workers=1)
    driver = Store(tmp_path / "driver.db")
    for c in expand(spec):
        res = capture_cell(c.key, c.config)
        assert res["status"] == "done" and set(res["rows"]) == {"runs", "rounds", "clients", "events"}
        assert len(res["rows"]["rounds"]["rows"]) == 3
        load_rows(driver, res["rows"])
    driver.close()
    local, remote = stored(tmp_path / "local.db"), stored(tmp_path / "driver.db")
    assert len(local) == 2 and local == remote


def test_without_ray_the_grid_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(PhalanxError, match=r"pip install 'phalanx\[ray\]'"):
        run_grid(parse_grid(GRID), tmp_path / "g.db", ray="")
    assert Store(tmp_path / "g.db").db.execute("SELECT COUNT(*) FROM bench_claims").fetchone()[0] == 0
    assert run_grid(parse_grid(GRID | {"defenses": {"mean": ["mean"]}}), tmp_path / "l.db", workers=1).ran == 2
    code = "import sys; sys.modules['ray'] = None; import phalanx, phalanx.bench, phalanx.bench_ray, phalanx.cli"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_an_address_where_nothing_listens_fails_at_once(tmp_path):
    """Ray itself would retry for minutes (and ignore Ctrl-C meanwhile)."""
    pytest.importorskip("ray")
    port = _free_ports(1)[0]
    with pytest.raises(PhalanxError, match=f"--ray 127.0.0.1:{port}: nothing answers there"):
        run_grid(parse_grid(GRID), tmp_path / "g.db", ray=f"127.0.0.1:{port}")
    assert Store(tmp_path / "g.db").db.execute("SELECT COUNT(*) FROM bench_claims").fetchone()[0] == 0


def test_ray_shutdown_is_bounded():
    """ray.shutdown() waits on the head without a deadline: the driver waits SHUTDOWN_GRACE at most,
    then leaves it running (and says so) instead of holding Ctrl-C for as long as the head hangs."""
    release = threading.Event()

    class Head:  # a head that answers at once, then one that does not answer
        calls = 0

        def shutdown(self):
            self.calls += 1
            if self.calls > 1:
                release.wait(60)

    head = Head()
    assert shutdown(head, grace=5) and head.calls == 1
    t0 = time.monotonic()
    try:
        with pytest.warns(RuntimeWarning, match="Ray did not disconnect within 0.3 s"):
            assert not shutdown(head, grace=0.3)
        assert time.monotonic() - t0 < 5 and head.calls == 2
    finally:
        release.set()


# ---------------------------------------------------------------- on a Ray head


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# Ray replaces 127.0.0.1 by the machine's outward address unless told that this is no cluster
# machine; with it every Ray process here binds and connects on the loopback only.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_raylet_start_wait_time_s": "60"}


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with 2 CPUs (``ray start --head --block``): (its address, the pid of
    ``ray start``, whose descendants are its processes); stopped after. On a loaded machine the
    raylet may give up waiting for its agents (15 s, fixed): a second try follows."""
    pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="phr", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        for attempt in (1, 2):
            head, address, log = _start_head(temp)
            if address is not None:
                break
            _stop(head)
        else:
            pytest.fail(f"the Ray head did not start twice; its last output:\n{log[-3000:]}")
        try:
            yield address, head.pid
        finally:
            _stop(head)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _start_head(temp: str) -> tuple[subprocess.Popen, str | None, str]:
    gcs, grpc, listen, env_agent, metrics, client = _free_ports(6)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
           "--num-gpus=0", "--include-dashboard=false", f"--dashboard-agent-grpc-port={grpc}",
           f"--dashboard-agent-listen-port={listen}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", "--disable-usage-stats",
           f"--temp-dir={temp}",
           # no autoscaler monitor or log monitor: fewer processes start beside the raylet's agents,
           # which must report within the raylet's 15 s
           "--no-monitor", "--include-log-monitor=false"]
    path = os.path.join(temp, "head.log")
    with open(path, "w") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | LOOPBACK,
                                start_new_session=True)
    deadline = time.monotonic() + 240
    while head.poll() is None and time.monotonic() < deadline:
        with open(path) as f:
            if "Ray runtime started" in f.read():
                return head, f"127.0.0.1:{gcs}", ""
        time.sleep(0.5)
    with open(path) as f:
        return head, None, f.read()


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to ``ray start --block`` and its group: it stops the processes it started."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def bench_cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "phalanx.cli.bench", "bench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | LOOPBACK | {"COLUMNS": "200"}, **kw)


def test_a_grid_on_a_ray_head_matches_a_local_run_resumes_and_stops_on_ctrl_c(tmp_path, ray_head):
    """One test, so that pytest-xdist never starts two heads."""
    address, head_pid = ray_head
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    cli = bench_cli(str(grid), "--db", str(tmp_path / "ray.db"), "--ray", address)
    run_grid(parse_grid(GRID), tmp_path / "local.db", workers=1)  # the reference, while the CLI starts
    out = cli.communicate(timeout=600)[0]
    assert cli.returncode == 0 and "4 cells, 0 already done" in out and "4 run, 0 failed" in out, out
    on_ray, local = stored(tmp_path / "ray.db"), stored(tmp_path / "local.db")
    assert set(on_ray) == set(local) == {c.key for c in expand(parse_grid(GRID))}
    # the same seeds, code and thread count (one torch thread per task as per local worker) on the
    # same machine: equal to the last bit, every round and client row included
    assert on_ray == local
    assert _count(tmp_path / "ray.db", "SELECT COUNT(*) FROM bench_claims") == 0

    # again with --redo and two endless cells, then Ctrl-C: the clean cells are skipped, the sign
    # cells run again and come back, the endless ones are cancelled and leave nothing behind
    slow = GRID | {"defenses": GRID["defenses"] | {"slow": {"stages": ["mean"], "federation": {"rounds": 100000}}}}
    grid.write_text(yaml.safe_dump(slow))
    cli = bench_cli(str(grid), "--db", str(tmp_path / "ray.db"), "--ray", address, "--redo", "sign/*")
    db, deadline = tmp_path / "ray.db", time.monotonic() + 300
    while not (_count(db, "SELECT COUNT(*) FROM runs WHERE status='done'") == 6
               and _count(db, "SELECT COUNT(*) FROM bench_claims") == 2 and len(_busy(head_pid)) == 2):
        assert cli.poll() is None and time.monotonic() < deadline, cli.communicate()[0]
        time.sleep(0.2)
    cli.send_signal(signal.SIGINT)
    # bounded whatever the head does: CANCEL_GRACE for the tasks, SHUTDOWN_GRACE for ray.shutdown,
    # and the rest (it takes 2-5 s) for the process's own exit on a loaded machine
    out = cli.communicate(timeout=CANCEL_GRACE + SHUTDOWN_GRACE + 45)[0]
    assert cli.returncode == 1 and "6 cells, 2 already done" in out and "2 run, 0 failed" in out, out
    assert "interrupted; rerun the same command to resume" in out, out
    again = stored(db)
    sign = {c.key for c in expand(parse_grid(GRID)) if c.coords["attack"] == "sign"}
    assert set(again) == set(local) and all(len(again[k]) == (2 if k in sign else 1) for k in again)
    assert all(runs[0] == runs[1] for k, runs in again.items() if k in sign)  # a redo repeats the run
    assert _count(db, "SELECT COUNT(*) FROM bench_claims") == 0
    deadline = time.monotonic() + 60
    while _busy(head_pid):  # the head's workers leave the endless cells
        assert time.monotonic() < deadline, _busy(head_pid)
        time.sleep(0.2)


def _count(db, sql: str) -> int:
    """A read-only look at the driver's store (no schema set-up, no write lock taken)."""
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # the driver has not made the tables yet
        return 0
    finally:
        con.close()


def _busy(root: int) -> list[int]:
    """Descendants of ``root`` running a grid cell (Ray titles a busy worker ray::TASK)."""
    parent, title = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title[int(pid)] = f.read()
        except (OSError, ValueError, IndexError):
            pass

    def under(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    return [p for p, t in title.items() if t.startswith(b"ray::capture_cell") and under(p)]
