"""benchmarks/cross_device.py --smoke: every combination runs and learns (results, not timings).

The smoke grid is 100 and 200 Fashion-MNIST clients x logreg, mlp x trimmed mean, the layered
default, two rounds of one local step each. Asserted: the table has a row for each of the eight
combinations, every row's accuracy is finite and above chance (10 classes), and the summary line
is printed.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from phalanx.data.datasets import IDX_FILES, find_files

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cross_device.py"


@pytest.mark.skipif(find_files("fashion-mnist", IDX_FILES) is None, reason="Fashion-MNIST is not installed")
def test_cross_device_benchmark_smoke():
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s*([\d,]+) (logreg|mlp)\s+(trimmed_mean|layered)\s.*\s(\S+)\s+load ", line)
        if m:
            rows[(int(m.group(1).replace(",", "")), m.group(2), m.group(3))] = float(m.group(4))
    want = {(n, model, d) for n in (100, 200) for model in ("logreg", "mlp") for d in ("trimmed_mean", "layered")}
    assert set(rows) == want, res.stdout
    for key, acc in rows.items():
        assert math.isfinite(acc) and acc > 0.15, (key, acc)
    assert res.stdout.strip().splitlines()[-1].startswith("summary:"), res.stdout
