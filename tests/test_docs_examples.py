"""Every Python example in docs/extending.md runs as written: it registers its piece and runs a
2-round federation with it on scikit-learn's digits."""

import re
from pathlib import Path

import pytest

from phalanx.registry import ATTACKS, DATASETS, DEFENSES, MODELS, POISONS

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
REGISTRIES = (ATTACKS, DATASETS, DEFENSES, MODELS, POISONS)


def examples() -> list[tuple[str, str]]:
    """(section title, code) of each ```python block, in order."""
    out, section = [], "top"
    for part in re.split(r"(^## .*$)", DOC.read_text(), flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        out += [(section, code) for code in re.findall(r"^```python\n(.*?)^```", part, flags=re.M | re.S)]
    return out


def test_the_page_has_the_four_examples():
    assert [s for s, _ in examples()] == ["An attack", "An aggregator", "A layer", "A dataset"]
    for _, code in examples():
        assert len(code.splitlines()) <= 45  # "about 20 lines" of piece, plus the imports and the run


@pytest.mark.parametrize("section, code", examples(), ids=[s for s, _ in examples()])
def test_example_runs(section, code, capsys):
    before = {reg.kind: set(reg.names()) for reg in REGISTRIES}
    scope: dict = {"__name__": "docs_example"}
    try:
        exec(compile(code, f"{DOC}:{section}", "exec"), scope)
        added = {reg.kind: set(reg.names()) - before[reg.kind] for reg in REGISTRIES}
        assert sum(map(len, added.values())) == 1, added  # the example registered its one piece
        final = scope["final"]
        assert 0.0 <= final["accuracy"] <= 1.0
        assert "accuracy" in capsys.readouterr().out
    finally:
        for reg in REGISTRIES:
            for name in set(reg.names()) - before[reg.kind]:
                reg.unregister(name)
