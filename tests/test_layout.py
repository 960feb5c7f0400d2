"""The package's layout: every module imports on its own, and no module-level import cycle."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Each module is imported in a child forked from a process that holds only third-party libraries
# (torch takes seconds to import, once), so every child starts without any phalanx module loaded.
IMPORT_EACH = r"""
import importlib, json, os, sys, traceback
import numpy, torch, pydantic, typer, rich, yaml, matplotlib, sklearn, pandas, cryptography
try:
    import flwr.serverapp, flwr.clientapp  # the [flower] extra, when installed
except ImportError:
    pass
failed = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc(limit=-3).encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    if os.waitpid(pid, 0)[1] != 0:
        failed[name] = err or "the child died"
print(json.dumps(failed))
"""


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of phalanx: dotted name -> (file, is a package)."""
    out = {}
    for path in sorted((SRC / "phalanx").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: at the top level, in if/try blocks and class bodies
    (``if TYPE_CHECKING:`` included), not inside functions."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo += getattr(node, field, None) or []
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the phalanx modules it imports at module level."""
    mods, graph = modules(), {}
    for name, (path, package) in mods.items():
        here = name if package else name.rpartition(".")[0]
        edges = set()
        for node in module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
                continue
            base = node.module or ""
            if node.level:
                up = here.split(".")[:len(here.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                edges.add(sub if sub in mods else base)
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_graph_sees_relative_and_absolute_imports():
    graph = import_graph()
    assert "phalanx.bench_spec" in graph["phalanx.bench"]
    assert "phalanx.bench_spec" in graph["phalanx.bench_privacy"]
    assert {"phalanx.cli.core", "phalanx.cli.bench", "phalanx.cli.keys"} <= graph["phalanx.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_phalanx_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    names = sorted(modules())
    assert {"phalanx.cli", "phalanx.cli.core", "phalanx.bench", "phalanx.bench_privacy"} <= set(names)
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(names)], capture_output=True,
                          text=True, timeout=600, cwd=SRC.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())


def test_cli_modules_live_in_the_cli_package():
    old = [p.name for p in (SRC / "phalanx").glob("*cli*.py")]
    assert not old, f"command-line modules outside phalanx/cli/: {old}"
