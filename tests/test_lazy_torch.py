"""Modules that import torch inside their functions (so that `embedlens validate` imports no torch) bind it in every
function that uses it: read with `ast`, a function of such a module that names ``torch`` (or ``F``, torch's
functional module) outside its annotations imports it itself or inside an enclosing function. A merged change that
adds code to such a module and uses the module-level name it no longer has fails here, not with a NameError in a run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "embedlens"
NAMES = {"torch", "F"}


def _loaded(nodes: list[ast.AST]) -> set[str]:
    """Names read in `nodes`, annotations left out (``from __future__ import annotations`` keeps them text)."""
    skip: set[int] = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = [*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs, n.args.vararg, n.args.kwarg]
                for a in args:
                    if a is not None and a.annotation is not None:
                        skip.update(id(x) for x in ast.walk(a.annotation))
                if n.returns is not None:
                    skip.update(id(x) for x in ast.walk(n.returns))
            elif isinstance(n, ast.AnnAssign):
                skip.update(id(x) for x in ast.walk(n.annotation))
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in skip}


def _bound(node: ast.AST) -> set[str]:
    """Names an import anywhere inside `node` binds."""
    return {a.asname or a.name.split(".")[0] for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}


def unbound_uses(source: str) -> list[str]:
    """``line name: names`` of each outermost function (or method) that reads a torch name the module does not bind."""
    tree = ast.parse(source)
    module_names = _bound(ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], []))
    module_names |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                     for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    watch = NAMES - module_names
    out = []

    def visit(body: list[ast.stmt]) -> None:
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                at_def = [*n.decorator_list, *n.args.defaults, *(d for d in n.args.kw_defaults if d is not None)]
                missing = (_loaded(n.body) - _bound(n)) & watch | _loaded(at_def) & watch
                if missing:
                    out.append(f"{n.lineno} {n.name}: {sorted(missing)}")
            elif isinstance(n, ast.ClassDef):
                if _loaded([*n.bases, *n.decorator_list]) & watch:
                    out.append(f"{n.lineno} class {n.name}: {sorted(_loaded([*n.bases, *n.decorator_list]) & watch)}")
                visit(n.body)
            elif isinstance(n, ast.If):
                visit(n.body)
                visit(n.orelse)
            elif not isinstance(n, (ast.Import, ast.ImportFrom)) and _loaded([n]) & watch:
                out.append(f"{n.lineno} module level: {sorted(_loaded([n]) & watch)}")

    visit(tree.body)
    return out


def test_a_function_that_names_torch_binds_it():
    found = {str(p.relative_to(PACKAGE.parent)): bad for p in sorted(PACKAGE.rglob("*.py"))
             if (bad := unbound_uses(p.read_text(encoding="utf-8")))}
    assert found == {}


def test_the_check_finds_a_use_the_module_no_longer_binds():
    planted = ("from __future__ import annotations\n\n"
               "def ok(x: torch.Tensor) -> torch.Tensor:\n    import torch\n\n    return torch.zeros(1)\n\n"
               "def bad(x: torch.Tensor):\n    return torch.zeros(1)\n\n"
               "def outer():\n    import torch\n\n    def inner():\n        return torch.ones(1)\n    return inner\n\n"
               "@torch.no_grad()\ndef decorated():\n    import torch\n")
    assert unbound_uses(planted) == ["8 bad: ['torch']", "19 decorated: ['torch']"]
    assert unbound_uses("import torch\n\ndef f():\n    return torch.zeros(1)\n") == []
