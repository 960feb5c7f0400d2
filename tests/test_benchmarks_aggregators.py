"""benchmarks/aggregators.py --smoke: every rule's result is right, not only its timing.

Timings are not asserted (machines are noisy). What is asserted, from the benchmark's table:

* every registered aggregator has a row, and none was skipped; the layered pipeline has one;
* the scaling table has a row per rule with a cell (ours / ByzFL / Flower) per n;
* every output is finite, and each rule with a float64 reference (mean, median, trimmed mean,
  Krum, Multi-Krum, Bulyan, geometric median, centered clipping, NNM+mean, FLTrust, bucketing)
  agrees with it within 1e-5 of max |U| (1e-3 for the geometric median's stopping rule): float32
  against float64 differs by a few float32 epsilons, so a wrong rule misses by orders of magnitude;
* robustness against the benchmark's simple attack (f = 2 of 12 rows at -3x the honest centre):
  every rule except the plain mean and bucketing around the mean either ends closer to the honest
  mean than the plain mean does (dev/mean < 1, the mean's own value being 1) or leaves every
  attack row out of its selection (Krum returns one honest row, which sits farther from the
  honest mean than the plain mean does, so only the second holds for it).
"""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "aggregators.py"
RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed", "centered_clipping",
         "nnm+mean", "bucketing", "dnc", "fltrust", "signguard", "foolsgold", "flame")
WITH_REFERENCE = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed",
                  "centered_clipping", "nnm+mean", "fltrust", "bucketing")
NOT_ROBUST = ("mean", "bucketing")  # bucketing's default inner rule is the mean


def test_aggregators_benchmark_smoke():
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    header = next(line for line in lines if line.startswith("name"))
    for col in ("ms", "x floor", "reference", "ref ms", "x faster", "ByzFL x", "Flower x", "ref err",
                "dev/mean", "attackers out"):
        assert col in header, header
    assert not any("skipped" in line for line in lines), res.stdout
    f = int(re.search(r"\bf=(\d+)", lines[0]).group(1))
    assert f == 2, lines[0]
    rows = {}
    for line in lines:
        m = re.fullmatch(r"(\S+)\s+.*\s(\S+)\s+(\d+\.\d+|nan)\s+(\d+/\d+|-)", line)
        if m and m.group(1) in RULES:
            rows[m.group(1)] = (m.group(2), float(m.group(3)), m.group(4))
    assert set(rows) == set(RULES), res.stdout
    for name, (err, dev, out) in rows.items():
        assert err != "nonfinite", name
        if name in WITH_REFERENCE:
            tol = 1e-3 if name == "geomed" else 1e-5
            assert err != "-" and float(err) <= tol, (name, err)
        if name not in NOT_ROBUST:
            assert dev < 1.0 or out == f"{f}/{f}", (name, dev, out)
    assert re.search(r"11 rules against a float64 reference .*all within tolerance", res.stdout), res.stdout
    for name in ("layered", "layered-14"):
        layered = next(line for line in lines if line.split()[0] == name)
        assert float(layered.split()[1]) > 0, layered
    # the scaling table: a row per rule, one cell (ours / ByzFL / Flower) per n
    at = lines.index(next(line for line in lines if line.startswith("scaling at d=")))
    scale_rows = {ln.split()[0]: ln for ln in lines[at + 3:] if ln and not ln.startswith("x floor")}
    assert set(scale_rows) >= {"mean", "median", "trimmed_mean", "krum", "multi_krum", "geomed",
                               "centered_clipping", "nnm+mean"}, res.stdout
    for name, line in scale_rows.items():
        assert len(re.findall(r"(\d+\.\d|-) / \S+ / \S+", line)) == 2, line
    assert re.fullmatch(r"x floor at n=12, d=4,096: median \d+\.\d, trimmed_mean \d+\.\d, krum \d+\.\d, "
                        r"multi_krum \d+\.\d, geomed \d+\.\d, centered_clipping \d+\.\d, bulyan \d+\.\d, "
                        r"nnm\+mean \d+\.\d, layered \d+\.\d, layered-14 \d+\.\d; (ByzFL not installed|n=20, d=2,048: faster than "
                        r"ByzFL on \d+/\d+ rules)", lines[-1]), lines[-1]
