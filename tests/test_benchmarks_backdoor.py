"""benchmarks/reproduce_backdoor.py --smoke: the backdoor numbers meet the benchmark's targets.

The smoke (digits, logistic regression, 10 clients of which 2 attackers, 30 rounds, IID; no attack,
pixel trigger and model replacement against all six defenses) prints 8 targets, the full run's.
All must be met but one, which the benchmark's docstring explains and which may miss only there:
clip + weak DP against the *unboosted* pixel trigger (its updates sit under the clip bound, so
clipping has nothing to cut; Sun et al. 2019 aim the norm bound at boosted updates, which the
model-replacement target checks). The test re-checks the numbers from the JSON with the same
bounds, so that a change to the printed targets cannot loosen them:

* FedAvg: pixel-trigger ASR > 90% with accuracy within 2 points of clean; model replacement
  > 90% in the round it fires;
* FLAME: pixel-trigger ASR < 10% within 3 points of clean; FLTrust: pixel-trigger ASR < 10%
  (Cao et al. 2021), a bound the benchmark does not print;
* clip + weak DP: model replacement < 10% in the round it fires, within 3 points of clean.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_backdoor.py"
MAY_MISS = {"clip+weakDP pixel-trigger ASR"}


def test_backdoor_benchmark_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    table = "\n".join(lines[:-1])
    for needle in ("FedAvg", "clip+weakDP", "FLAME", "FoolsGold", "FLTrust", "Multi-Krum", "pixel trigger",
                   "model replacement", "no attack", "[iid] clean FedAvg accuracy", "targets:", "persistence"):
        assert needle in table, needle
    rows = [ln for ln in lines if re.match(r"(pixel trigger|model replacement|no attack)\s+\d", ln)]
    assert len(rows) == 3 and all(len(re.findall(r"\d+\.\d / \d+\.\d", r)) == 6 for r in rows), rows

    targets = [re.fullmatch(r"  (.+): -?\d+\.\d% [<>] \d+\.\d%  (met|MISSED).*", ln) for ln in lines]
    targets = {m.group(1): m.group(2) == "met" for m in targets if m}
    assert len(targets) == 8, targets
    missed = {k for k, ok in targets.items() if not ok}
    assert missed <= MAY_MISS, missed
    m = re.fullmatch(r"headline \[iid\]: FedAvg pixel-trigger ASR \d+\.\d% \(acc [+-]\d+\.\d pts\); "
                     r"model replacement \d+\.\d%; FLAME \d+\.\d% \([+-]\d+\.\d pts\); "
                     r"clip\+weakDP \d+\.\d% \([+-]\d+\.\d pts\); targets met (\d+)/8", lines[-1])
    assert m and int(m.group(1)) == 8 - len(missed), lines[-1]
    assert (tmp_path / "reproduce_backdoor_iid.png").stat().st_size > 1000

    data = json.loads((tmp_path / "reproduce_backdoor.json").read_text())
    cells, fire = data["cells"], data["settings"]["fire"]
    assert len(cells) == 3 * 6 and all(len(c["asr"]) == 30 for c in cells.values())

    def asr(attack, defense):  # the benchmark's rule: final round; model replacement: its round
        c = cells[f"iid/{attack}/{defense}"]
        return c["asr"][fire] if attack == "replacement" else c["asr"][-1]

    def acc(attack, defense):  # mean of the last 3 rounds
        return sum(cells[f"iid/{attack}/{defense}"]["acc"][-3:]) / 3

    clean = acc("clean", "fedavg")
    assert asr("pixel", "fedavg") > 0.9 and clean - acc("pixel", "fedavg") < 0.02
    assert asr("replacement", "fedavg") > 0.9
    assert asr("pixel", "flame") < 0.1 and clean - acc("pixel", "flame") < 0.03
    assert asr("pixel", "fltrust") < 0.1
    assert asr("replacement", "clip_dp") < 0.1 and clean - acc("pixel", "clip_dp") < 0.03
