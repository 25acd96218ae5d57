"""The layering rule: no module of ``commpress`` imports one that imports it back.

Imports are read from the source with ``ast`` (lazy imports inside functions
count too: a cycle broken only by deferring the import is still a cycle in
the design). A module that imports a package depends on the package's
``__init__`` (which depends on whatever it imports); ``from pkg import x``
depends on the submodule ``pkg.x`` when there is one, else on ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import commpress

ROOT = Path(commpress.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: {commpress modules it imports}}`` for every module under ``commpress``."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node)
                for alias in node.names:
                    # ``from pkg import sub`` depends on ``pkg.sub`` when that is a module,
                    # else on ``pkg`` itself (a name defined there).
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in files else target)
        graph[module] = {d for d in deps if d in files and d != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    edges = [
        f"{a} -> {b}"
        for component in found
        for a in component
        for b in sorted(graph[a])
        if b in component
    ]
    assert not found, f"{len(found)} import cycle(s) through: " + "; ".join(edges)
