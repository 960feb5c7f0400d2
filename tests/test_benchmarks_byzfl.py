"""benchmarks/byzfl_side_by_side.py --smoke, phalanx's column only: it runs, prints the table and the
headline, and phalanx's cnn_mnist has the parameter count of ByzFL's (431,080)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from phalanx.data.datasets import IDX_FILES, find_files
from phalanx.models import build_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "byzfl_side_by_side.py"
BYZFL_PARAMS = 431_080


def test_cnn_mnist_has_byzfl_parameter_count():
    model = build_model("cnn_mnist", (1, 28, 28), 10, seed=0)
    assert sum(p.numel() for p in model.parameters()) == BYZFL_PARAMS


@pytest.mark.skipif(find_files("fashion-mnist", IDX_FILES) is None, reason="Fashion-MNIST is not installed")
def test_byzfl_side_by_side_smoke_phalanx_column():
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--frameworks", "phalanx"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert f"phalanx d = {BYZFL_PARAMS:,}, ByzFL's {BYZFL_PARAMS:,}" in out, out
    assert re.search(r"^framework\s+rounds\s+final acc\s+wall s\s+loop s\s+s/round\s+d$", out, re.M), out
    row = re.search(r"^phalanx\s+5\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)$", out, re.M)
    assert row, out
    acc, wall = float(row.group(1)), float(row.group(2))
    assert 0 < acc <= 100 and wall > 0
    assert int(row.group(5).replace(",", "")) == BYZFL_PARAMS
    assert re.search(r"^ByzFL\s+5(\s+-){5}$", out, re.M), out  # not run
    last = out.strip().splitlines()[-1]
    assert last.startswith("phalanx vs ByzFL (cnn_mnist, ALIE vs trimmed mean, 5 rounds): accuracy "), last
    assert f"accuracy {acc:.1f}% vs n/a" in last and "ByzFL not run" in last, last
