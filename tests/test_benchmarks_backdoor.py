"""benchmarks/reproduce_backdoor.py --smoke runs, prints its table, targets and a headline last line."""

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_backdoor.py"


def test_backdoor_benchmark_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    table = "\n".join(lines[:-1])
    for needle in ("FedAvg", "clip+weakDP", "FLAME", "FoolsGold", "FLTrust", "Multi-Krum", "pixel trigger",
                   "DBA", "semantic", "model replacement", "constrain+scale", "neurotoxin", "no attack",
                   "[iid] clean FedAvg accuracy", "[dirichlet] clean FedAvg accuracy", "targets:", "persistence"):
        assert needle in table, needle
    rows = [ln for ln in lines if re.match(r"(pixel trigger|DBA|semantic|no attack)\s", ln)]
    assert len(rows) == 8 and all(len(re.findall(r"\d+\.\d / \d+\.\d", r)) == 6 for r in rows), rows
    assert re.fullmatch(r"headline \[iid\]: FedAvg pixel-trigger ASR \d+\.\d% \(acc [+-]\d+\.\d pts\); "
                        r"model replacement \d+\.\d%; FLAME \d+\.\d% \([+-]\d+\.\d pts\); "
                        r"clip\+weakDP \d+\.\d% \([+-]\d+\.\d pts\); targets met \d+/14", lines[-1]), lines[-1]
    assert (tmp_path / "reproduce_backdoor_iid.png").stat().st_size > 1000
    cells = json.loads((tmp_path / "reproduce_backdoor.json").read_text())["cells"]
    assert len(cells) == 2 * 7 * 6 and all(len(c["asr"]) == 2 for c in cells.values())
