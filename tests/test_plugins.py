"""Plug-ins: the user's modules, from --plugin, a config's or a grid's ``plugins:`` list, or the
``phalanx.plugins`` entry points, are imported before names resolve (in grid workers too)."""

import sys
import textwrap
import uuid

import pytest
import yaml
from typer.testing import CliRunner

from phalanx import plugins
from phalanx.cli import app
from phalanx.config import load_config, parse_config
from phalanx.errors import ConfigError
from phalanx.registry import DATASETS, DEFENSES
from phalanx.store import Store

runner = CliRunner()

PLUGIN = '''
import torch
from phalanx import DEFENSES, Aggregator, Report


class PluginMean(Aggregator):
    name = "{name}"

    def __call__(self, U, w, ctx):
        keep = w > 0
        return U[keep].mean(dim=0), Report(self.name, U.shape[0], selected=keep.clone())


@DEFENSES.register("{name}")
def plugin_mean(f: int = 0) -> Aggregator:
    """An unweighted mean, from a plug-in file. It ignores f."""
    return PluginMean()
'''

BASE = {"data": {"dataset": "digits"}, "model": {"name": "logreg"},
        "federation": {"num_clients": 6, "rounds": 2, "batch_size": 16, "lr": 0.1}}


@pytest.fixture
def plugin_file(tmp_path):
    """A plug-in file registering an aggregator of a fresh name; (path, name). Unregistered after."""
    name = f"plugmean_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "my_stages.py"
    path.write_text(PLUGIN.format(name=name))
    yield path, name
    for reg in (DEFENSES, DATASETS):
        for n in reg.names():
            if n.startswith(("plugmean_", "plugset_")):
                reg.unregister(n)


def test_run_imports_the_configs_plugin_relative_to_the_config(plugin_file, tmp_path, monkeypatch):
    path, name = plugin_file
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "name": "plug", "plugins": ["my_stages.py"], "defense": [name]}))
    monkeypatch.chdir("/")  # relative to the config file, not to the current folder
    db = tmp_path / "res.db"
    r = runner.invoke(app, ["run", str(cfg), "--db", str(db), "--quiet"])
    assert r.exit_code == 0, r.output
    (run,) = Store(db).runs()
    stored = Store(db).read_run(run["run_id"]).config
    assert run["status"] == "done" and stored["plugins"] == [str(path.resolve())] and stored["defense"] == [name]


def test_command_line_plugin_joins_the_config(plugin_file, tmp_path, monkeypatch):
    path, name = plugin_file
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"defense=[{name}]"], plugins=["my_stages.py"])
    assert cfg.plugins == [str(path.resolve())] and cfg.defense == [name]
    r = runner.invoke(app, ["list", "aggregators", "--plugin", "my_stages.py"])
    assert r.exit_code == 0 and name in r.output
    assert "An unweighted mean, from a plug-in file." in " ".join(r.output.split())  # its first sentence
    r = runner.invoke(app, ["--plugin", str(path), "list"], terminal_width=200)
    assert r.exit_code == 0 and name in r.output


def test_unknown_name_without_the_plugin_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown defense 'plugmean_nothere'"):
        parse_config({**BASE, "defense": ["plugmean_nothere"]})


@pytest.mark.parametrize("entry, message", [
    ("missing.py", "plugin 'missing.py': no such file"),
    ("broken.py", r"plugin 'broken.py' \(.*broken.py\) cannot be imported: ZeroDivisionError: division by zero"),
    ("no_such_module_xyz", "plugin 'no_such_module_xyz' cannot be imported: ModuleNotFoundError"),
    ("imports_missing", "plugin 'imports_missing' cannot be imported: ModuleNotFoundError: No module named "
                        "'not_installed_abc'"),
])
def test_a_plugin_that_cannot_be_imported_is_named_with_its_error(tmp_path, entry, message):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "imports_missing.py").write_text("import not_installed_abc\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "plugins": [entry]}))
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)
    r = runner.invoke(app, ["run", str(cfg), "--db", str(tmp_path / "x.db")])
    assert r.exit_code == 1 and "Traceback" not in r.output and entry in r.output
    sys.modules.pop("imports_missing", None)


def test_a_dotted_module_beside_the_config(tmp_path):
    mod = f"plugset_mod_{uuid.uuid4().hex[:6]}"
    name = f"plugset_{uuid.uuid4().hex[:6]}"
    (tmp_path / f"{mod}.py").write_text(PLUGIN.format(name=name))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "plugins": [mod], "defense": [name]}))
    try:
        assert load_config(cfg).plugins == [mod] and name in DEFENSES
    finally:
        sys.modules.pop(mod, None)
        if name in DEFENSES:
            DEFENSES.unregister(name)
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


def test_entry_points_register_an_installed_packages_pieces(tmp_path, monkeypatch):
    name = f"plugset_ep_{uuid.uuid4().hex[:6]}"
    mod = f"plugset_pkg_{uuid.uuid4().hex[:6]}"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(f"""
        from phalanx import DEFENSES
        from phalanx.defenses.robust import mean


        def register():
            DEFENSES.register("{name}")(lambda f=0: mean(f))
        """))
    dist = tmp_path / "plugset_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugset-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[phalanx.plugins]\nmine = {mod}:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_ENTRY_POINTS", None)
    try:
        cfg = parse_config({**BASE, "defense": [name]})  # the entry point loads before validation
        assert cfg.defense == [name] and "mine" in plugins.load_entry_points()
    finally:
        sys.modules.pop(mod, None)
        if name in DEFENSES:
            DEFENSES.unregister(name)
    (dist / "entry_points.txt").write_text("[phalanx.plugins]\nbad = plugset_absent_module\n")
    monkeypatch.setattr(plugins, "_ENTRY_POINTS", None)
    with pytest.raises(ConfigError, match="plugin entry point 'bad' .*cannot be imported: ModuleNotFoundError"):
        parse_config(BASE)
    monkeypatch.setattr(plugins, "_ENTRY_POINTS", None)
    (dist / "entry_points.txt").write_text("")
    plugins.load_entry_points()


def test_a_two_cell_grid_with_two_spawn_workers_imports_the_plugin(plugin_file, tmp_path):
    path, name = plugin_file
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "plug", "plugins": ["my_stages.py"], "base": BASE, "byzantine": [1],
        "attacks": {"clean": {"family": "none"}, "sign": {"family": "random", "name": "sign_flip"}},
        "defenses": {"mine": [name]}, "seeds": [0]}))
    db = tmp_path / "grid.db"
    r = runner.invoke(app, ["bench", str(grid), "--db", str(db), "--workers", "2"], terminal_width=200)
    assert r.exit_code == 0, r.output
    runs = Store(db).runs()
    assert len(runs) == 2 and {x["status"] for x in runs} == {"done"}, runs
    for x in runs:
        assert Store(db).read_run(x["run_id"]).config["defense"] == [name]
