"""The package's import graph has no circle.

Every ``import`` of one kernrnn module by another counts, at module level or
inside a function (a lazy import that closes a circle still ties the two
modules together); imports under ``if TYPE_CHECKING:`` do not.  Read from the
source with :mod:`ast`, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kernrnn"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _nodes(body):
    """Every node of ``body``, leaving out ``if TYPE_CHECKING:`` blocks."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _nodes(node.orelse)
            continue
        yield node
        yield from _nodes(list(ast.iter_child_nodes(node)))


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports.  ``from pkg import sub`` names the
    submodule ``pkg.sub``, not the package."""
    files = module_files(package)
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in _nodes(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in files else node.module)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_kernrnn_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert "kernrnn.cell" in graph["kernrnn.plugins"]  # the graph was read
    assert circles(graph) == []


def test_the_check_finds_a_circle(tmp_path):
    """A lazy import that closes a circle is found; a TYPE_CHECKING one is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg import a\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    assert circles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]
