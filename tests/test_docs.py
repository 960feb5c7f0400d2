"""The repository documents itself: docs/design.md names every module of the package, and no
tracked file points outside the repository for its design."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_tracked_file_refers_outside_the_repository():
    needle = "../" + "shared"  # spelt in two parts so that this file does not match itself
    bad = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if needle in text or re.search(r"(?<![\w/])DESIGN\.md", text):
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"these files refer to a design document outside the repository (use docs/design.md): {bad}"


def test_design_names_every_module_of_the_package():
    text = DESIGN.read_text()
    layout = text[text.index("## Layout of the package"):]
    block = layout[layout.index("```") + 3:]
    block = block[:block.index("```")]
    listed, folder = set(), None
    for line in block.splitlines():
        m = re.match(r"^(\s*)(\S+)", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        if indent == 2 and name.endswith(".py"):
            listed.add(name)
            folder = None
        elif indent == 2 and name.endswith("/"):
            folder = name
        elif indent == 4 and folder and name.endswith(".py"):
            listed.add(folder + name)
    actual = {str(p.relative_to(ROOT / "src" / "phalanx")) for p in (ROOT / "src" / "phalanx").rglob("*.py")}
    assert not actual - listed, f"modules missing from docs/design.md's layout: {sorted(actual - listed)}"
    assert not listed - actual, f"docs/design.md lists modules that do not exist: {sorted(listed - actual)}"


def test_readme_links_the_design():
    readme = (ROOT / "README.md").read_text()
    assert "docs/design.md" in readme and "docs/extending.md" in readme


def test_no_figure_is_left_as_a_placeholder():
    """A timing or figure still to be measured (TOUR_CPU, DEMO_WALL, ...) never reaches the docs."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    left = {str(p.relative_to(ROOT)): sorted(set(re.findall(r"\b[A-Z]+_(?:TIME|CPU|WALL|LOAD)\b", p.read_text())))
            for p in docs}
    assert not {k: v for k, v in left.items() if v}, left
