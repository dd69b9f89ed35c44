"""No import circle in the package: the modules' imports, read with `ast`, form a graph without a cycle.

Every import counts, wherever it stands (inside a function, under
``TYPE_CHECKING``): a circle that only a lazy import keeps from failing at
start-up still ties the modules together. ``from pkg import sub`` counts as an
import of the submodule ``pkg.sub``, not of ``pkg/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "embedlens"


def module_graph(package: Path) -> dict[str, set[str]]:
    """`{module: modules of the package it imports}` for every ``.py`` file under `package`."""
    files = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path

    def known(name: str) -> str | None:  # the longest prefix of `name` that is a module of the package
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package_of = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package_of.split(".")[: len(package_of.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in files]
                targets = subs if len(subs) == len(node.names) else [source, *subs]
            else:
                continue
            for target in targets:
                found = known(target)
                if found is not None and found != module:
                    graph[module].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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


def test_the_package_has_no_import_circle():
    graph = module_graph(PACKAGE)
    assert len(graph) > 50  # the walk found the package
    assert cycles(graph) == []


def test_adapters_import_neither_the_zoo_nor_the_test_models():
    graph = module_graph(PACKAGE)
    adapters = [m for m in graph if m == "embedlens.adapters" or m.startswith("embedlens.adapters.")]
    reached = {t for m in adapters for t in graph[m]}
    assert not {t for t in reached if t.startswith(("embedlens.zoo", "embedlens.testing"))}


def test_the_walk_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (pkg / "a.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from pkg.sub.b import B\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "sub" / "c.py").write_text("from ..a import A\n")
    (pkg / "d.py").write_text("from pkg import a\n")  # into the circle, not part of it
    graph = module_graph(pkg)
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
