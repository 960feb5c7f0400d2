"""Grids shared by several processes, interrupted cells, and the server's f as a grid axis (issue 12)."""

import copy
import subprocess
import sys
import time

import yaml

from phalanx.bench import expand, parse_grid, run_grid
from phalanx.store import Store

GRID = {
    "name": "split",
    "base": {"data": {"dataset": "digits"}, "model": {"name": "logreg"},
             "federation": {"num_clients": 6, "rounds": 2, "batch_size": 16, "lr": 0.1}},
    "byzantine": [0.34],
    "attacks": {"clean": {"family": "none"}, "sign": {"family": "random", "name": "sign_flip"},
                "gauss": {"family": "random", "name": "gaussian"}},
    "defenses": {"mean": ["mean"], "median": ["median"]},
    "seeds": [0, 1],
}


def test_two_bench_processes_split_the_cells(tmp_path):
    """Before: each process ran every cell (24 done rows for 12 cells)."""
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    db = tmp_path / "g.db"
    code = ("import sys; from phalanx.bench import load_grid, run_grid; "
            "o = run_grid(load_grid(sys.argv[1]), sys.argv[2], workers=1); print(o.ran)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(grid), str(db)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    ran = [int(p.communicate(timeout=300)[0].split()[-1]) for p in procs]
    cells = len(expand(parse_grid(GRID)))
    runs = Store(db).runs()
    assert cells == 12 and sum(ran) == cells, ran
    assert len([r for r in runs if r["status"] == "done"]) == cells
    assert len({r["cell"] for r in runs}) == cells


def test_a_killed_owner_is_reclaimed_and_its_run_marked_interrupted(tmp_path):
    db = tmp_path / "g.db"
    spec = parse_grid(GRID)
    key = expand(spec)[0].key
    store = Store(db)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = store.start_run({"x": 1}, "killed", 0, cell=key)
    run_grid(spec, db, workers=1, limit=0)  # creates the tables
    store.db.execute("INSERT INTO bench_claims VALUES (?,?,?,?,?)",
                     (key, "old", __import__("socket").gethostname(), dead.pid, time.time()))
    out = run_grid(spec, db, workers=1)
    assert out.ran == 12
    assert store.read_run(stale).status == "interrupted"
    assert store.db.execute("SELECT COUNT(*) FROM bench_claims").fetchone()[0] == 0
    assert not [r for r in store.runs() if r["status"] == "running"]


def test_a_live_claim_is_left_to_its_owner(tmp_path):
    db = tmp_path / "g.db"
    spec = parse_grid(GRID)
    key = expand(spec)[0].key
    run_grid(spec, db, workers=1, limit=0)
    store = Store(db)
    store.db.execute("INSERT INTO bench_claims VALUES (?,?,?,?,?)",
                     (key, "other", __import__("socket").gethostname(), __import__("os").getppid(), time.time()))
    out = run_grid(spec, db, workers=2)
    assert out.ran == 11 and key not in store.done_cells()


def test_interrupted_grid_marks_its_running_cell(tmp_path, monkeypatch):
    import phalanx.federation as federation

    real = federation.Federation.run_round

    def ctrl_c(self, rnd):
        if rnd == 1:
            raise KeyboardInterrupt
        return real(self, rnd)

    monkeypatch.setattr(federation.Federation, "run_round", ctrl_c)
    db = tmp_path / "g.db"
    out = run_grid(parse_grid(GRID), db, workers=1)
    assert out.interrupted and out.ran == 0
    (run,) = Store(db).runs()
    assert run["status"] == "interrupted"


def test_defense_f_axis_labels_only_the_rules_that_use_f(tmp_path):
    g = copy.deepcopy(GRID)
    g.update(defense_f=[1, "auto"], seeds=[0], attacks={"sign": GRID["attacks"]["sign"]},
             defenses={"mean": ["mean"], "tm": ["trimmed_mean"]})
    cells = expand(parse_grid(g))
    labels = sorted({c.coords["defense"] for c in cells})
    assert labels == ["mean", "tm f=1", "tm f=auto"]
    f_of = {c.coords["defense"]: c.config["defense_f"] for c in cells}
    assert f_of["tm f=1"] == 1 and f_of["tm f=auto"] == "auto"
    out = run_grid(parse_grid(g), tmp_path / "g.db", workers=1)
    assert out.ran == len(cells) and not out.failed
    finals = {r["cell"]: r["final"] for r in Store(tmp_path / "g.db").runs()}
    got = {c.coords["defense"]: finals[c.key].get("defense_f") for c in cells}
    assert got == {"mean": None, "tm f=1": 1, "tm f=auto": 0}  # auto: floor((6 - 3) / 4)


def test_report_rows_name_the_f_they_assumed(tmp_path):
    from phalanx.report.tables import headline, load_results, summarize

    g = copy.deepcopy(GRID)
    g.update(seeds=[0], attacks={"sign": GRID["attacks"]["sign"]}, defenses={"mean": ["mean"], "tm": ["trimmed_mean"]},
             defense_f=[1])
    run_grid(parse_grid(g), tmp_path / "g.db", workers=1)
    res = load_results(Store(tmp_path / "g.db"))
    _, rows, _ = headline(res, summarize(res))
    assert [r[0] for r in rows] == ["mean", "tm (f=1)"]


def test_report_has_one_filled_row_per_f_guess(tmp_path):
    from phalanx.report.tables import headline, load_results, summarize

    g = copy.deepcopy(GRID)
    g.update(seeds=[0], attacks={"sign": GRID["attacks"]["sign"]}, defenses={"mean": ["mean"], "tm": ["trimmed_mean"]},
             defense_f=[0, 1])
    run_grid(parse_grid(g), tmp_path / "g.db", workers=1)
    res = load_results(Store(tmp_path / "g.db"))
    _, rows, _ = headline(res, summarize(res))
    assert [r[0] for r in rows] == ["mean", "tm f=0", "tm f=1"]
    assert all(r[1] != "-" for r in rows)  # each row found its runs
