"""benchmarks/aggregators.py --smoke runs, prints its table and a headline last line."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "aggregators.py"


def test_aggregators_benchmark_smoke():
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    header = next(line for line in lines if line.startswith("name"))
    for col in ("ms", "x floor", "reference", "ref ms", "x faster"):
        assert col in header, header
    names = {line.split()[0] for line in lines[2:-1] if line and not line.startswith("-")}
    for name in ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed",
                 "centered_clipping", "nnm+mean", "bucketing", "dnc", "fltrust", "signguard",
                 "foolsgold", "flame"):
        assert name in names, res.stdout
    assert not any("skipped" in line for line in lines), res.stdout
    assert re.fullmatch(r"median \d+\.\dx floor, trimmed_mean \d+\.\dx floor; "
                        r"krum \d+x faster than per-pair reference", lines[-1]), lines[-1]
