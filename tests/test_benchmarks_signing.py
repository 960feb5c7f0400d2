"""benchmarks/signing.py --smoke runs, prints its table and a headline last line."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "signing.py"


def test_signing_benchmark_smoke():
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    table = "\n".join(lines[:-1])
    for col in ("sign ms/update", "verify ms/update", "median agg ms", "verify/median", "1k"):
        assert col in table, table
    assert re.fullmatch(r"verify of 25 updates at d=1k = \d+\.\d\dx of one median aggregation "
                        r"\(\d+\.\dx of one mean; signing \d+\.\d\d ms per update\)", lines[-1]), lines[-1]
