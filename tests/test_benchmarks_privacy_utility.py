"""benchmarks/privacy_utility.py --smoke: leakage and utility meet the benchmark's targets.

The smoke runs iDLG (LeNet, Fashion-MNIST, batch 1, 3 seeds, 300 evaluations) and FedAvg on digits
(MLP, 10 clients, 10 rounds) per defense setting; the benchmark's docstring derives the targets and
all 9 must be met. The test re-checks the table's numbers with the same bounds:

* undefended: median PSNR >= 30 dB; noise 0.1, pruning 90% and DP-SGD eps 8: < 15 dB;
* undefended FL accuracy >= 0.7; DP-SGD costs >= 5 points; noise or pruning stays within 5;
* the FL run's accounted epsilon in [0.95, 1] x 8 (printed to 2 decimals: <= 8.00).
"""

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
    assert lines[-1].startswith("summary: best defense under 15 dB: "), lines[-1]
    assert lines[-1].endswith("targets met 9/9"), "\n".join(line for line in lines if "MISSED" in line) or lines[-1]
    rows = {}
    for label in ("none", "noise 0.1", "prune 90%", "DP-SGD eps 8"):
        line = next(line for line in lines if line.startswith(label + " "))
        rows[label] = line[len(label):].split()  # median PSNR, share >= 30 dB, accuracy, epsilon
    psnr = {k: float(v[0]) for k, v in rows.items()}
    acc = {k: float(v[2]) for k, v in rows.items()}
    assert psnr["none"] >= 30
    assert all(psnr[k] < 15 for k in ("noise 0.1", "prune 90%", "DP-SGD eps 8")), psnr
    assert acc["none"] >= 0.7 and acc["none"] - acc["DP-SGD eps 8"] >= 0.05, acc
    assert max(acc["noise 0.1"], acc["prune 90%"]) >= acc["none"] - 0.05, acc
    assert 0.95 * 8 <= float(rows["DP-SGD eps 8"][3]) <= 8.0  # the FL run's accounted epsilon reaches its target
    assert out.is_file() and out.stat().st_size > 1000
