#!/usr/bin/env python3
"""Render a phalanx HTML report in headless Chromium, save a PNG of its first screen, check it is clean.

    python scripts/screenshot_report.py results/report/report.html [--out report.png] [--chromium PATH]

Checks: Chromium's log (``--enable-logging=stderr --v=0``) shows no uncaught script error, console
error or failed resource load; the DOM Chromium built (``--dump-dom``) holds the comparative table,
and every figure is an inline ``data:image/png`` image (no external assets); the screenshot is a
PNG that is not blank. Exit status: 0 when clean, 1 with one line per problem, 2 when Chromium is
missing. Chromium is an optional system package: on Debian or Ubuntu, install it with
``sudo apt-get update && sudo apt-get install -y chromium``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000"]
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium")
# log lines that mean the page itself misbehaved (Chromium's own start-up noise is ignored)
PAGE_ERRORS = re.compile(r"Uncaught|CONSOLE\(\d+\)\].*(error|Error)|net::ERR_|Failed to load resource|"
                         r"Refused to (load|execute)")


def find_chromium(given: str | None) -> str | None:
    for c in ([given] if given else CANDIDATES):
        path = shutil.which(c) or (c if Path(c).is_file() else None)
        if path:
            return path
    return None


def run(chromium: str, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="phalanx-chromium-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def blank(png: Path) -> bool | None:
    """True when the screenshot is a single colour (None when matplotlib is unavailable to check)."""
    try:
        import matplotlib.image as mpimg
    except ImportError:
        return None
    img = mpimg.imread(str(png))
    return bool(img.std() == 0)


def check(report: Path, out: Path, chromium: str, timeout: int = 90) -> list[str]:
    """Problems found while rendering ``report`` (empty when clean); writes the screenshot to ``out``."""
    url = report.resolve().as_uri()
    problems = []
    shot = run(chromium, ["--enable-logging=stderr", "--v=0", f"--screenshot={out.resolve()}",
                          "--window-size=1280,900", url], timeout)
    problems += [f"chromium log: {line.strip()}" for line in shot.stderr.splitlines() if PAGE_ERRORS.search(line)]
    if not out.is_file() or out.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        problems.append(f"no screenshot written to {out} (chromium exit {shot.returncode}): {shot.stderr[-300:]}")
    elif blank(out):
        problems.append(f"the screenshot {out} is blank")
    dom = run(chromium, ["--dump-dom", url], timeout).stdout
    if 'id="comparative-table"' not in dom:
        problems.append("the rendered DOM has no comparative table (id=comparative-table)")
    imgs = re.findall(r"<img\b[^>]*>", dom)
    if not imgs:
        problems.append("the rendered DOM has no figure images")
    external = [i for i in imgs if 'src="data:image/png;base64,' not in i]
    if external:
        problems.append(f"{len(external)} image(s) are not inline PNGs, e.g. {external[0][:120]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path, help="the report.html written by `phalanx report`")
    ap.add_argument("--out", type=Path, default=None, help="PNG to write (default: beside the report)")
    ap.add_argument("--chromium", default=None, help="Chromium binary (default: chromium on PATH)")
    ap.add_argument("--timeout", type=int, default=90, help="seconds per Chromium run")
    a = ap.parse_args(argv)
    if not a.report.is_file():
        print(f"error: report: expected an HTML file, got a missing path {a.report}", file=sys.stderr)
        return 1
    chromium = find_chromium(a.chromium)
    if chromium is None:
        print("error: Chromium not found (looked for: " + ", ".join([a.chromium] if a.chromium else CANDIDATES)
              + "); install it with `sudo apt-get update && sudo apt-get install -y chromium`, "
              "or pass --chromium PATH", file=sys.stderr)
        return 2
    out = a.out or a.report.with_suffix(".png")
    try:
        problems = check(a.report, out, chromium, a.timeout)
    except subprocess.TimeoutExpired:
        problems = [f"chromium did not finish within {a.timeout} s"]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {out} ({out.stat().st_size} bytes); no page errors; table and inline figures present")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
