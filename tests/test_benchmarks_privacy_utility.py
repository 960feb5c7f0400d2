import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_privacy_utility_smoke(tmp_path):
    out = tmp_path / "pu.png"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "privacy_utility.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("summary: ")
    for label in ("none", "noise 0.1", "prune 90%", "DP-SGD eps 8"):
        assert any(line.startswith(label) for line in lines), label
    dp = next(line for line in lines if line.startswith("DP-SGD"))
    assert 7.5 <= float(dp.split()[-1]) <= 8.05  # the FL run's accounted epsilon reaches its target
    assert out.is_file() and out.stat().st_size > 1000
