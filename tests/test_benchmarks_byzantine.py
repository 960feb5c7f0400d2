import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_reproduce_byzantine_smoke(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce_byzantine.py"), "--smoke",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("summary: iid: best worst-case") and ", 0 errors" in lines[-1]
    for word in ("alie", "ipm", "minmax", "minsum", "fang_krum", "fang_trmean", "mimic", "label_flip"):
        assert word in r.stdout
    for name in ("krum", "bulyan", "cclip", "nnm+trmean", "fltrust", "flame", "signguard", "layered"):
        assert any(line.startswith(name + " ") for line in lines), name
    assert out.is_file()
