"""The server's own guess of f, and state that survives a kill and a resume (issue 12)."""

import pytest

from phalanx.checkpoint import load_checkpoint
from phalanx.config import parse_config
from phalanx.errors import ConfigError
from phalanx.federation import Federation
from phalanx.store import Store

TIMINGS = ("seconds", "agg_seconds", "sign_seconds")


class Killed(Exception):
    pass


def _figures(store: Store, run_id: str):
    """Every stored number of a run except wall-clock timings."""
    rec = store.read_run(run_id)
    rounds = [{k: v for k, v in r.items() if k not in TIMINGS} for r in rec.rounds]
    clients = store.client_rows(run_id)
    return rounds, clients, rec.final, rec.status


def test_server_f_is_a_guess_not_the_truth(tiny_config):
    tiny_config["federation"]["num_clients"] = 20
    tiny_config["attack"] = {"name": "sign_flip", "byzantine": 7}
    tiny_config["defense"] = ["trimmed_mean"]
    fed = Federation(parse_config(tiny_config))
    assert fed.server_f == 4  # auto: floor((20 - 3) / 4), whatever the attack's count (7)
    assert fed.defense.aggregator.f == 4
    tiny_config["defense_f"] = 2
    assert Federation(parse_config(tiny_config)).defense.aggregator.f == 2
    tiny_config["defense_f"] = 0.4  # a fraction of the round's clients
    assert Federation(parse_config(tiny_config)).defense.aggregator.f == 8
    tiny_config["federation"]["clients_per_round"] = 10
    assert Federation(parse_config(tiny_config)).defense.aggregator.f == 4


def test_server_f_is_stored_with_the_run(tiny_config, tmp_path):
    tiny_config["federation"].update(rounds=1, num_clients=9)
    tiny_config["defense"] = ["median"]
    tiny_config["defense_f"] = 3
    store = Store(tmp_path / "r.db")
    fed = Federation(parse_config(tiny_config))
    fed.run(store)
    rec = store.read_run(fed.run_id)
    assert rec.final["defense_f"] == 3 and rec.config["defense_f"] == 3
    tiny_config["defense"] = ["mean"]  # no stage uses f: nothing claimed
    fed = Federation(parse_config(tiny_config))
    assert "defense_f" not in fed.run()


@pytest.mark.parametrize("bad, msg", [(-1, "a count >= 0"), (1.5, "fraction must be < 1"),
                                      ("half", "auto"), (True, "a count >= 0")])
def test_defense_f_typos_are_clear(tiny_config, bad, msg):
    tiny_config["defense_f"] = bad
    with pytest.raises(ConfigError, match="defense_f"):
        parse_config(tiny_config)


def test_defense_f_above_the_round_is_refused(tiny_config):
    tiny_config["defense_f"] = 7  # 6 clients
    with pytest.raises(ConfigError, match="defense_f: at most the 6 clients"):
        Federation(parse_config(tiny_config))


def _kill_and_resume(cfg, tmp_path, after: int = 2):
    store = Store(tmp_path / "r.db")
    whole = Federation(cfg)
    whole.run(store)
    ck = tmp_path / "ck.pt"
    first = Federation(cfg)

    def die(res):
        if res.round == after:
            raise Killed

    with pytest.raises(Killed):
        first.run(store, on_round=die, checkpoint=ck)
    assert store.read_run(first.run_id).status == "failed"  # never left 'running'
    assert load_checkpoint(ck)["round"] == after + 1
    second = Federation(cfg)  # a fresh process would build everything anew
    second.run(store, checkpoint=ck)
    return store, whole.run_id, first.run_id


def test_every_stored_figure_survives_a_resume_dp_sgd(tiny_config, tmp_path):
    """DP-SGD: epsilon after kill + resume equals the uninterrupted run's (the accountant's steps
    are in the checkpoint); before the fix it restarted from zero."""
    tiny_config["federation"].update(rounds=5, dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    tiny_config["attack"] = {"byzantine": 1}
    store, a, b = _kill_and_resume(parse_config(tiny_config), tmp_path)
    ra, rb = _figures(store, a), _figures(store, b)
    assert ra == rb
    assert ra[2]["epsilon"] > ra[0][1]["epsilon"]


def test_every_stored_figure_survives_a_resume_reputation(tiny_config, tmp_path):
    """Reputation's quarantine and the first-quarantine rounds survive a resume."""
    tiny_config["federation"].update(rounds=6, num_clients=8)
    tiny_config["attack"] = {"name": "sign_flip", "byzantine": 2}
    tiny_config["defense"] = ["median", "reputation"]
    tiny_config["defense_f"] = 2
    store, a, b = _kill_and_resume(parse_config(tiny_config), tmp_path, after=3)
    ra, rb = _figures(store, a), _figures(store, b)
    assert ra == rb
    assert ra[2].get("quarantined_attackers") == 2  # the figure the old checkpoint lost


def test_resumed_run_is_marked_done(tiny_config, tmp_path):
    tiny_config["federation"]["rounds"] = 4
    store, _, b = _kill_and_resume(parse_config(tiny_config), tmp_path, after=1)
    assert store.read_run(b).status == "done"
    assert any(e["kind"] == "resumed" for e in store.events(b))


def test_error_in_round_one_marks_the_run_failed(tiny_config, tmp_path):
    tiny_config["federation"]["rounds"] = 3
    fed = Federation(parse_config(tiny_config))
    store = Store(tmp_path / "r.db")

    def boom(res):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fed.run(store, on_round=boom)
    rec = store.read_run(fed.run_id)
    assert rec.status == "failed" and "disk full" in rec.final["error"]


def test_interrupt_marks_the_run_interrupted(tiny_config, tmp_path):
    fed = Federation(parse_config(tiny_config))
    store = Store(tmp_path / "r.db")

    def ctrl_c(res):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fed.run(store, on_round=ctrl_c)
    assert store.read_run(fed.run_id).status == "interrupted"


def test_quarantine_precision_and_recall_per_round(tiny_config, tmp_path):
    tiny_config["federation"].update(rounds=6, num_clients=8)
    tiny_config["attack"] = {"name": "sign_flip", "byzantine": 2}
    tiny_config["defense"] = ["median", "reputation"]
    tiny_config["defense_f"] = 2
    store = Store(tmp_path / "r.db")
    fed = Federation(parse_config(tiny_config))
    final = fed.run(store)
    rounds = store.read_run(fed.run_id).rounds
    last = rounds[-1]
    assert last["quarantined"] == 2 and last["quarantine_precision"] == 1.0 and last["quarantine_recall"] == 1.0
    assert rounds[0]["quarantine_precision"] is None  # nobody quarantined yet
    assert final["honest_ever_quarantined"] == 0 and final["quarantined_attackers"] == 2


def test_a_clean_run_has_no_attackers_to_quarantine(tiny_config):
    """Clients drawn as Byzantine that never attack are honest: quarantining one is a false positive."""
    tiny_config["federation"].update(rounds=2, num_clients=8)
    tiny_config["attack"] = {"byzantine": 2}
    tiny_config["defense"] = ["median", "reputation"]
    fed = Federation(parse_config(tiny_config))
    final = fed.run()
    assert fed.attackers() == set() and "quarantined_attackers" not in final


def test_sigterm_on_phalanx_run_marks_the_run_interrupted(tiny_config, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    tiny_config["federation"].update(rounds=200, num_clients=6)
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(tiny_config))
    db = tmp_path / "r.db"
    proc = subprocess.Popen([sys.executable, "-c", "from phalanx.cli import main; main()", "run", str(cfgp),
                             "--db", str(db), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few rounds are stored
        if db.exists():
            runs = Store(db).runs()
            if runs and len(Store(db).read_run(runs[0]["run_id"]).rounds) >= 3:
                break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    (run,) = Store(db).runs()
    assert run["status"] == "interrupted", out
    assert proc.returncode == 130 and "--resume" in out
