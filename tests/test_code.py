"""The code itself: layers without import cycles (import-linter), ruff's lint and format, and no cycles at all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


def test_layers_hold():
    """pyproject.toml's import-linter contracts: lower layers never import upper ones; analysis never imports torch."""
    pytest.importorskip("importlinter", reason="the test extra installs import-linter")
    lint = "from importlinter.cli import lint_imports_command; lint_imports_command()"  # the lint-imports script
    out = subprocess.run([sys.executable, "-c", lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_import_cycles():
    """No module reaches itself through imports, function-level imports included (the cycles a layer check misses)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("stackwise_bench")
    edges = {
        m: {i for i in graph.find_modules_directly_imported_by(m) if not _package_init(m, i)} for m in graph.modules
    }
    cycles = [scc for scc in _strongly_connected(edges) if len(scc) > 1]
    assert not cycles, f"import cycles among: {cycles}"


def _package_init(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodule is how packages re-export, not a cycle."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: each group of modules that import one another in a circle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            out.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("args", [("ruff", "check", "."), ("ruff", "format", "--check", ".")], ids=["check", "format"])
def test_ruff(args):
    pytest.importorskip("ruff", reason="the test extra installs ruff")
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
