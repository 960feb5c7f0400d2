import yaml
from typer.testing import CliRunner

from phalanx.cli import app
from phalanx.store import Store

runner = CliRunner()


def write(tmp_path, cfg):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_run_then_show(tmp_path, tiny_config):
    cfg = write(tmp_path, tiny_config)
    db = tmp_path / "res.db"
    r = runner.invoke(app, ["run", str(cfg), "--db", str(db), "--set", "federation.rounds=2"])
    assert r.exit_code == 0, r.output
    assert "round   2/2" in r.output and "final metrics" in r.output and "accuracy" in r.output
    (run,) = Store(db).runs()
    assert run["status"] == "done" and 0 <= run["final"]["accuracy"] <= 1
    assert len(Store(db).read_run(run["run_id"]).rounds) == 2
    r = runner.invoke(app, ["show", str(db)])
    assert r.exit_code == 0 and run["run_id"] in r.output and "tiny" in r.output


def test_bad_config_is_one_clear_line(tmp_path, tiny_config):
    cfg = write(tmp_path, tiny_config)
    r = runner.invoke(app, ["run", str(cfg), "--db", str(tmp_path / "x.db"), "--set", "federation.rouds=2"])
    assert r.exit_code == 1
    assert "federation.rouds: unknown key" in r.output and "Traceback" not in r.output


def test_list_shows_registries():
    r = runner.invoke(app, ["list"], terminal_width=200)
    assert r.exit_code == 0
    for word in ("fashion-mnist", "digits", "cnn", "lenet", "mean"):
        assert word in r.output


def test_show_missing_db(tmp_path):
    r = runner.invoke(app, ["show", str(tmp_path / "nope.db")])
    assert r.exit_code == 1 and "no results store" in r.output
