import copy

import pytest
import yaml
from typer.testing import CliRunner

import phalanx.federation as federation
from phalanx.bench import cell_key, expand, load_grid, parse_grid, run_grid
from phalanx.bench_privacy import audit_rule
from phalanx.cli.bench import register
from phalanx.config import parse_config
from phalanx.errors import ConfigError
from phalanx.store import Store

TINY = {
    "name": "tiny",
    "base": {"data": {"dataset": "digits"}, "model": {"name": "logreg"},
             "federation": {"num_clients": 6, "rounds": 2, "batch_size": 16, "lr": 0.1}},
    "byzantine": [0.34],
    "attacks": {"clean": {"family": "none"}, "sign": {"family": "random", "name": "sign_flip"}},
    "defenses": {"mean": ["mean"]},
    "seeds": [0],
}


@pytest.fixture
def counter(monkeypatch):
    """Counts Federation.run calls; ``fail_on`` makes the n-th call raise (an interruption)."""
    calls = {"n": 0, "fail_on": None}
    real = federation.Federation.run

    def run(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == calls["fail_on"]:
            raise RuntimeError("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(federation.Federation, "run", run)
    return calls


def test_grid_runs_is_stored_and_skipped_when_rerun(tmp_path, counter):
    spec, db = parse_grid(TINY), tmp_path / "g.db"
    out = run_grid(spec, db, workers=1)
    assert (out.total, out.ran, out.skipped, out.failed) == (2, 2, 0, [])
    runs = Store(db).runs()
    assert [r["status"] for r in runs] == ["done", "done"] and counter["n"] == 2
    assert {r["cell"] for r in runs} == {c.key for c in expand(spec)}
    again = run_grid(spec, db, workers=1)
    assert (again.ran, again.skipped) == (0, 2) and counter["n"] == 2 and len(Store(db).runs()) == 2


def test_redo_reruns_the_matching_done_cells_and_keeps_the_old_runs(tmp_path, counter):
    spec, db = parse_grid(TINY), tmp_path / "g.db"
    run_grid(spec, db, workers=1)
    out = run_grid(spec, db, workers=1, redo=["sign/*"])
    assert (out.ran, out.skipped) == (1, 1) and counter["n"] == 3 and len(Store(db).runs()) == 3
    with pytest.raises(ConfigError, match=r"redo: 'sgn/\*' matches no cell.*attacks clean, sign"):
        run_grid(spec, db, workers=1, redo=["sgn/*"])


def test_interrupted_grid_resumes_with_the_remaining_cell(tmp_path, counter):
    spec, db = parse_grid(TINY), tmp_path / "g.db"
    assert run_grid(spec, db, workers=1, limit=1).ran == 1 and counter["n"] == 1
    out = run_grid(spec, db, workers=1)
    assert (out.ran, out.skipped) == (1, 1) and counter["n"] == 2


def test_a_crashed_cell_is_recorded_and_rerun(tmp_path, counter):
    spec, db = parse_grid(TINY), tmp_path / "g.db"
    counter["fail_on"] = 1
    out = run_grid(spec, db, workers=1)
    assert out.ran == 1 and len(out.failed) == 1 and "simulated crash" in out.failed[0][1]
    assert sorted(r["status"] for r in Store(db).runs()) == ["done"]  # crashed before start_run
    out = run_grid(spec, db, workers=1)
    assert (out.ran, out.skipped, out.failed) == (1, 1, []) and counter["n"] == 3


def test_sigterm_interrupts_the_grid_like_ctrl_c(tmp_path, monkeypatch):
    import os
    import signal

    def killed(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(federation.Federation, "run", killed)
    before = signal.getsignal(signal.SIGTERM)
    out = run_grid(parse_grid(TINY), tmp_path / "g.db", workers=1)
    assert out.interrupted and out.ran == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back afterwards


def test_a_spawned_worker_matches_in_process(tmp_path):
    spec = parse_grid(TINY)
    run_grid(spec, tmp_path / "a.db", workers=1)
    run_grid(spec, tmp_path / "b.db", workers=1, limit=1)
    out = run_grid(spec, tmp_path / "b.db", workers=2)  # the remaining cell, in one 'spawn' worker
    assert (out.ran, out.skipped, out.failed) == (1, 1, [])
    finals = [{r["cell"]: r["final"]["accuracy"] for r in Store(tmp_path / p).runs()} for p in ("a.db", "b.db")]
    assert finals[0] == finals[1]  # deterministic, whichever process ran the cell


def test_cell_key_ignores_name_and_explicit_defaults():
    a = parse_config({"name": "x", "seed": 1, "data": {"dataset": "digits"}})
    b = parse_config({"name": "y", "seed": 1, "data": {"dataset": "digits", "partition": "iid"},
                      "federation": {"lr": 0.05}})
    c = parse_config({"name": "x", "seed": 2, "data": {"dataset": "digits"}})
    assert cell_key(a) == cell_key(b) != cell_key(c)


def test_expansion_crosses_every_axis_and_adds_a_clean_reference():
    g = copy.deepcopy(TINY)
    g["attacks"] = {"sign": {"family": "random", "name": "sign_flip"}}
    g.update(partitions=[{"partition": "iid"}, {"partition": "dirichlet", "alpha": 0.5}], seeds=[0, 1],
             defenses={"mean": ["mean"], "signed": {"stages": ["verify", "mean"], "federation": {"signing": True}}})
    cells = expand(parse_grid(g))
    assert len(cells) == 2 * 2 * 2 * 2  # partitions x attacks (sign + added clean) x defenses x seeds
    assert {c.coords["partition"] for c in cells} == {"iid", "dirichlet(0.5)"}
    signed = [c for c in cells if c.coords["defense"] == "signed"]
    assert all(c.config["federation"]["signing"] for c in signed)
    assert len({c.key for c in cells}) == len(cells)


@pytest.mark.parametrize("patch, words", [
    ({"atacks": {}}, ["atacks: unknown key", "allowed"]),
    ({"attacks": {"s": {"family": "random", "name": "sign_flip", "oops": 1}}}, ["attacks.s.oops: unknown key"]),
    ({"attacks": {"s": {"family": "random", "name": "sign_flp"}}}, ["attack=s", "sign_flp"]),
    ({"attacks": {"s": {"family": "none", "name": "sign_flip"}}}, ["attacks.s", "family 'none'"]),
    ({"defenses": {"k": [{"krum": {"f": -1}}]}}, ["defense=k", "krum"]),
    ({"baseline": "nope"}, ["baseline", "nope"]),
])
def test_bad_grids_name_the_field(patch, words):
    g = copy.deepcopy(TINY) | patch
    with pytest.raises(ConfigError) as e:
        expand(parse_grid(g))
    for w in words:
        assert w in str(e.value)


def test_audit_rule_follows_the_stages():
    assert audit_rule(["mean"], 10) == [] and audit_rule([{"clip": {"max_norm": "auto"}}, "krum"], 10) == []
    assert audit_rule([{"update_clip": {"max_norm": 2}}, {"grad_noise": {"sigma": 0.1}}, "mean"], 10) == [
        ["clip", 2.0], ["noise", 0.1, "gaussian"]]
    assert audit_rule([{"update_clip": {"max_norm": 2}}, "mean", {"central_dp": {"noise_multiplier": 1.5, "clip": 2}}],
                      10) == [["clip", 2.0], ["noise", 6.0, "gaussian"]]  # 2 z C: the mean's sensitivity is 2C max p
    assert audit_rule([{"update_clip": {"max_norm": 2}}, "mean", {"central_dp": {"noise_multiplier": 1.5}}],
                      10) == [["clip", 2.0], ["noise", 6.0, "gaussian"]]
    assert audit_rule(["mean", {"weak_dp": {"sigma": 0.01}}], 20) == [["noise", 0.2, "gaussian"]]
    assert audit_rule([{"prune": {"ratio": 0.9}}, "median"], 10) == [["prune", 0.9]]
    assert audit_rule(["mean"], 10, dp_sgd=(1.5, 2.0)) == [["clip", 2.0], ["noise", 3.0, "gaussian"]]


def test_cli_bench_and_errors(tmp_path):
    import typer

    app = typer.Typer()
    register(app)
    grid = tmp_path / "tiny.yaml"
    grid.write_text(yaml.safe_dump(TINY))
    runner = CliRunner()
    r = runner.invoke(app, ["bench", str(grid), "--db", str(tmp_path / "g.db"), "--set", "seeds=[1]"],
                      terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "2 run" in r.output and "Random" in r.output and "Overhead" in r.output
    assert load_grid(grid, ["seeds=[1]"]).seeds == [1]
    r = runner.invoke(app, ["bench", str(grid), "--set", "base.federation.rouds=2", "--db", str(tmp_path / "x.db")])
    assert r.exit_code == 1 and "rouds" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["bench", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 1 and "grid file not found" in r.output
    r = runner.invoke(app, ["report", str(tmp_path / "none.db"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 1 and "none.db" in r.output
