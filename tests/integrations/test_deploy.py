"""A real Flower deployment across processes, on 127.0.0.1 only: SuperLink with TLS and SuperNode
authentication, SuperNodes each signing with its own key, the run submitted with ``flwr run``.

1. Faults: 5 SuperNodes for 3 rounds; one sends NaN arrays, one a forged envelope and then a
   replay of its first reply, one is killed mid-round. Every round finishes, every rejection is
   recorded with its reason, the killed node is recorded missing, and the final model is finite
   and more accurate than the initial one.
2. The server (SuperLink and ServerApp) is killed mid-run and restarted; the run is submitted
   again and resumes from the ServerApp's checkpoint under the same run id.

Each test takes 2-4 minutes on a loaded 2-core machine (each round starts a fresh ClientApp
process per node). Every process is bounded by ``timeout`` and killed at the end; the tests check
that none is left. They are never skipped: Flower is a dev dependency.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from phalanx.integrations.local_deploy import LocalDeployment, _children_matching
from phalanx.keys import KeyRegistry

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "deploy" / "flower_app"
AUTH = shutil.which("ssh-keygen") is not None  # node keys are made with ssh-keygen


def run_config(d: LocalDeployment, work: Path, **extra):
    return {"registry": str(d.registry), "registry-seen": str(work / "server" / "registry.seq"),
            "admin-fingerprint": d.admin_fingerprint, "summary": str(work / "summary.json"),
            "store": str(work / "server" / "runs.db"), "round-timeout": 240, "node-wait": 240, **extra}


def wait_for(pred, limit: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    assert pred(), f"timed out waiting for {what}"


def finish(d: LocalDeployment, proc: subprocess.Popen, limit: float, name: str = "run") -> None:
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {limit} s; last output:\n{d.log(name)[-3000:]}")
    assert proc.returncode == 0, f"flwr run failed ({proc.returncode}):\n{d.log(name)[-3000:]}"


def no_processes_left(d: LocalDeployment) -> None:
    left = d.stop()
    assert not left, f"processes left behind: {left}"
    ports = [d.port] + [n.port for n in d.nodes]
    assert not [p for port in ports for p in _children_matching(port)]


def test_faults_across_processes(tmp_path):
    marker = tmp_path / "hang.marker"
    faults = {2: {"phalanx-fault": "nan"}, 3: {"phalanx-fault": "forge-replay"},
              4: {"phalanx-fault": "hang", "phalanx-fault-round": 2, "phalanx-fault-marker": str(marker)}}
    d = LocalDeployment(tmp_path / "w", 5, APP, tls=True, auth=AUTH, node_config=faults, limit=840)
    t0 = time.monotonic()
    try:
        d.start()
        proc = d.submit(run_config(d, tmp_path, **{"expected-nodes": 5, "min-nodes": 2}), limit=780)
        wait_for(marker.exists, 600, proc, "node org4 to stall in round 2")
        d.kill_node(4)  # mid-round: its ClientApp is running round 2 when the node dies
        finish(d, proc, 600)
        log = d.log("run")
    finally:
        no_processes_left(d)
    s = json.loads((tmp_path / "summary.json").read_text())
    print(f"fault run: {time.monotonic() - t0:.0f} s; accuracy {s['accuracy']}; "
          + "; ".join(f"round {h['round']}: {h['rejections']}, missing {h['missing']}" for h in s["history"]))
    assert s["status"] == "done" and s["rounds_done"] == 3 and [h["round"] for h in s["history"]] == [1, 2, 3]
    assert not any(h["skipped"] for h in s["history"])
    by_client = [{c["client_id"]: c["reasons"] for c in h["clients"]} for h in s["history"]]
    for k, rows in enumerate(by_client):
        assert rows["org0"] == [] and rows["org1"] == []
        assert rows["org2"] == ["validate:nonfinite"]
        assert rows["org3"] == ["verify:bad_signature" if k == 0 else "verify:stale_round"]
    assert s["history"][0]["rejections"] == {"bad_signature": 1, "nonfinite": 1}
    assert s["history"][1]["rejections"] == s["history"][2]["rejections"] == {"nonfinite": 1, "stale_round": 1}
    org4 = int(next(n for n, c in s["bindings"].items() if c == "org4"))
    assert by_client[0]["org4"] == [] and "org4" not in by_client[1]
    assert s["history"][1]["missing"] == [org4]
    cause = s["history"][1]["missing_causes"][str(org4)]
    assert "Node Unavailable" in cause or "no reply" in cause
    assert "org4" not in by_client[2]  # gone: missing again, or no longer sampled
    assert s["final_finite"] is True
    acc = {int(k): v for k, v in s["accuracy"].items()}
    assert acc[3] > acc[0] + 0.2, acc
    # the server's log names every rejection and the missing node
    assert "rejected: verify:bad_signature" in log and "rejected: verify:stale_round" in log
    assert "rejected: validate:nonfinite" in log and f"no update from node {org4}" in log


def test_server_restart_resumes_from_its_checkpoint(tmp_path):
    d = LocalDeployment(tmp_path / "w", 3, APP, tls=True, auth=AUTH, limit=840)
    ck = tmp_path / "server.pt"
    rc = run_config(d, tmp_path, **{"expected-nodes": 3, "min-nodes": 2, "checkpoint": str(ck)})
    try:
        d.start()
        first = d.submit(rc, name="run1", limit=780)
        wait_for(ck.exists, 600, first, "the checkpoint of round 1")
        d.restart_superlink()  # the server machine goes down mid-run and comes back
        first.wait(timeout=120)
        assert not (tmp_path / "summary.json").exists() or json.loads((tmp_path / "summary.json").read_text())[
            "rounds_done"] < 3
        for attempt in range(3):  # the restarted SuperLink may take a moment to accept runs
            second = d.submit(rc, name=f"run2-{attempt}", limit=600)
            second.wait(timeout=600)
            if second.returncode == 0 or "unavailable" not in d.log(f"run2-{attempt}").lower():
                break
            time.sleep(5)
        assert second.returncode == 0, d.log(f"run2-{attempt}")[-3000:]
        first_id = next(line.split("phalanx: run ")[1].split()[0] for line in d.log("run1").splitlines()
                        if "phalanx: run " in line)
        log2 = d.log(f"run2-{attempt}")
    finally:
        no_processes_left(d)
    s = json.loads((tmp_path / "summary.json").read_text())
    print(f"restart run: resumed after round {s['resumed_from']}; accuracy {s['accuracy']}")
    assert s["run_id"] == first_id and f"resumed run {first_id} after round" in log2
    assert s["status"] == "done" and s["rounds_done"] == 3 and 1 <= s["resumed_from"] < 3
    assert [h["round"] for h in s["history"]] == [1, 2, 3] and not any(h["skipped"] for h in s["history"])
    assert all(not c["reasons"] for h in s["history"] for c in h["clients"])
    # the server kept the registry's seq in its own folder: a restart refuses any older copy
    assert int((tmp_path / "server" / "registry.seq").read_text()) == KeyRegistry.open(d.registry).seq
    acc = {int(k): v for k, v in s["accuracy"].items()}
    assert acc[3] >= acc[s["resumed_from"]] and acc[3] > 0.6 and s["final_finite"]
    from phalanx.store import Store

    with Store(tmp_path / "server" / "runs.db") as store:
        run = store.read_run(first_id)
        assert run.status == "done" and [r["round"] for r in run.rounds] == [1, 2, 3]
        assert [e["kind"] for e in store.events(first_id)] == ["resumed"]
