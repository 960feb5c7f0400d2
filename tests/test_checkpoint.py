import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from phalanx.checkpoint import load_checkpoint
from phalanx.config import parse_config
from phalanx.errors import PhalanxError
from phalanx.federation import Federation
from phalanx.store import Store


class Killed(Exception):
    pass


def test_resume_after_interrupt_gives_identical_params(tiny_config, tmp_path):
    tiny_config["federation"]["rounds"] = 5
    tiny_config["attack"] = {"name": "sign_flip", "byzantine": 1}
    tiny_config["defense"] = ["centered_clipping"]  # stateful: its state must survive the resume
    cfg = parse_config(tiny_config)
    whole = Federation(cfg)
    whole.run()

    ck = tmp_path / "ck.pt"
    store = Store(tmp_path / "r.db")
    first = Federation(cfg)

    def die(res):
        if res.round == 2:
            raise Killed

    with pytest.raises(Killed):
        first.run(store, on_round=die, checkpoint=ck)
    assert load_checkpoint(ck)["round"] == 3
    second = Federation(cfg)
    second.run(store, checkpoint=ck)
    assert torch.equal(second.params, whole.params)
    (run,) = store.runs()
    rec = store.read_run(run["run_id"])
    assert [r["round"] for r in rec.rounds] == [0, 1, 2, 3, 4] and rec.status == "done"
    assert any(e["kind"] == "resumed" for e in store.events(run["run_id"]))


def test_checkpoint_from_other_config_is_refused(tiny_config, tmp_path):
    ck = tmp_path / "ck.pt"
    tiny_config["federation"]["rounds"] = 1
    Federation(parse_config(tiny_config)).run(checkpoint=ck)
    tiny_config["seed"] = 99
    with pytest.raises(PhalanxError, match="different config"):
        Federation(parse_config(tiny_config)).run(checkpoint=ck)
    ck.write_bytes(b"garbage")
    with pytest.raises(PhalanxError, match="unreadable checkpoint"):
        Federation(parse_config(tiny_config)).run(checkpoint=ck)


def test_cli_kill_and_resume(tiny_config, tmp_path):
    """A real SIGKILL in the middle of `phalanx run`, then `--resume`, reaches the uninterrupted model."""
    tiny_config["federation"].update(rounds=40, num_clients=6)
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(tiny_config))
    exe = [sys.executable, "-c", "from phalanx.cli import main; main()"]
    db, ck = tmp_path / "r.db", tmp_path / "ck.pt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(exe + ["run", str(cfgp), "--db", str(db), "--checkpoint", str(ck), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if ck.exists() and load_checkpoint(ck)["round"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ck)["round"]
    assert 3 <= killed_at < 40, "the run was not interrupted in the middle"
    r = subprocess.run(exe + ["run", str(cfgp), "--db", str(db), "--checkpoint", str(ck), "--resume", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = load_checkpoint(ck)["params"]
    ck2 = tmp_path / "whole.pt"  # the uninterrupted run, in the same kind of process
    r = subprocess.run(exe + ["run", str(cfgp), "--db", str(tmp_path / "w.db"), "--checkpoint", str(ck2), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert torch.equal(resumed, load_checkpoint(ck2)["params"])
