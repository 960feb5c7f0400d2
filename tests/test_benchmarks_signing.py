"""benchmarks/signing.py --smoke: the signature check it prints passes, and its table and headline.

Timings are not asserted (machines are noisy). The check that is: every honestly signed row is
accepted, and every forged row of every kind (changed after signing, signed by another key, another
client's envelope, replayed, another round, another run) is rejected with its own reason: n/n each,
no tolerance (one forged row let through is a broken authentication layer).
"""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "signing.py"
KINDS = ("tampered row", "wrong key", "impersonation", "replay", "stale round", "wrong run")


def test_signing_benchmark_smoke():
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    table = "\n".join(lines[:-1])
    for col in ("sign ms/update", "verify ms/update", "median agg ms", "verify/median", "1k"):
        assert col in table, table
    check = next(line for line in lines if line.startswith("signature check"))
    assert "honest rows accepted 25/25" in check, check
    for kind in KINDS:
        assert re.search(rf"{kind} 25/25\b", check), (kind, check)
    assert re.fullmatch(r"verify of 25 updates at d=1k = \d+\.\d\dx of one median aggregation "
                        r"\(\d+\.\dx of one mean; signing \d+\.\d\d ms per update\)", lines[-1]), lines[-1]
