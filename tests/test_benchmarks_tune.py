"""The layered-default search (benchmarks/tune_layered.py) in its smoke mode."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tune_smoke_ranks_candidates_by_their_worst_case(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/tune_layered.py"), "--smoke", "--workers", "1",
                        "--db", str(tmp_path / "t.db"), "--write", str(tmp_path / "winner.yaml")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    rows = {}
    for line in lines:
        m = re.match(r"(\S+)\s+(\d+\.\d) .*?(\d+\.\d)% .*\s(-?\d+\.\d)$", line)
        if m and not line.startswith(("winner", "tuning")):
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)), float(m.group(4)))
    assert set(rows) == {"mean", "tm", "sf+tm+rep"}, r.stdout
    # target: NaN updates break plain FedAvg (accuracy 0, a drop of at least 50 points), while every
    # candidate with 'validate' in front survives them (its worst drop stays under 50 points)
    assert rows["mean"][0] >= 50
    assert all(drop < 50 for name, (drop, _, _) in rows.items() if name != "mean")
    shortfalls = [rows[name][2] for name in rows]
    # ranked best first; candidates within 0.5 points tie and go by clean cost, then overhead
    assert all(b >= a - 0.5 for a, b in zip(shortfalls, shortfalls[1:])), shortfalls
    assert lines[-1].startswith("winner: ") and not lines[-1].startswith("winner: mean ")
    assert "defense:" in (tmp_path / "winner.yaml").read_text()

    # the target check of benchmarks/layered_targets.py reads the same store: plain FedAvg misses the
    # 5-point target because NaN updates zero it, and the line names the attack
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/layered_targets.py"), str(tmp_path / "t.db"),
                        "--grid", "tune", "--defense", "mean"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    drops = [line for line in r.stdout.splitlines()[:-1] if "worst drop vs clean FedAvg" in line]
    assert len(drops) == 2 and all("MISSED" in line and "(nonfinite)" in line for line in drops), r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("mean: ")


def test_tune_held_out_checks_a_named_winner_without_the_tuning_grid(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/tune_layered.py"), "--smoke", "--workers", "1",
                        "--db", str(tmp_path / "h.db"), "--held-out", "--winner", "tm", "--attacks", "clean,nonfinite"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tuning grid" not in r.stdout
    assert [line for line in r.stdout.splitlines() if line.startswith("-- ")] == [
        "-- seed 1", "-- dirichlet 0.1", "-- 10% byzantine", "-- 30% byzantine", "-- dsgd"]
    # validate in front: NaN rows cost the candidate far less than the 50 points they cost FedAvg
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("held-out tm: worst shortfall"), last
    assert float(re.search(r"drop (-?\d+\.\d) pts", last).group(1)) < 50, last
