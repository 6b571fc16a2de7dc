"""The package's import graph: every module imports on its own, and no two modules import each other
(directly or around a loop), whether at module level or inside a function."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flux_lightning"

# Cycles tolerated for now, each as its sorted module names. Keep it empty: a cycle is fixed by the
# dependency direction (move the shared piece down), not by hiding an import inside a function.
ALLOWED_CYCLES: list[list[str]] = []

_ISOLATED_IMPORTS = r"""
import importlib, json, pkgutil, sys, traceback

package = sys.argv[1]
names = [package] + [m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")]
failures = {}
for name in names:
    for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps({"modules": names, "failures": failures}))
"""


def isolated_imports(package: str, path: str | None = None) -> dict:
    """Import each module of ``package``, each time after dropping every module of the package from
    ``sys.modules`` (third-party packages stay cached, so the whole walk takes seconds); returns
    ``{"modules": [...], "failures": {module: traceback}}``."""
    env = None if path is None else {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", _ISOLATED_IMPORTS, package], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_module_imports_alone():
    """Each module, imported first into a process without any ``flux_lightning`` module loaded, imports."""
    report = isolated_imports("flux_lightning")
    assert {"flux_lightning.adapters.lokr", "flux_lightning.callbacks.adapter_export"} <= set(report["modules"])
    assert not report["failures"], "\n".join(f"{name}:\n{tb}" for name, tb in report["failures"].items())


def test_isolated_imports_report_every_failure(tmp_path):
    pkg = tmp_path / "isopkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("X = 1\n")
    (pkg / "bad.py").write_text("from .good import Y\n")
    (pkg / "worse.py").write_text("import isopkg.bad\n")
    report = isolated_imports("isopkg", str(tmp_path))
    assert set(report["modules"]) == {"isopkg", "isopkg.good", "isopkg.bad", "isopkg.worse"}
    assert set(report["failures"]) == {"isopkg.bad", "isopkg.worse"}
    assert "cannot import name 'Y'" in report["failures"]["isopkg.worse"]


# -- the static import graph ----------------------------------------------------------------------
def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _runtime_imports(tree: ast.AST):
    """Every import statement that can run (module level or inside functions), not ``if TYPE_CHECKING``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(importer: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The package modules whose code ``node`` runs (by name), as edges of the import graph.

    Importing ``a.b.c`` runs ``a``'s and ``a.b``'s ``__init__`` too, except for the importer's own
    ancestors (Python has imported those before the importer's first line). ``from P import n`` reads
    the submodule ``P.n`` if there is one, else the name ``n`` from ``P``'s ``__init__``.
    """
    package = importer if _is_package(importer, modules) else importer.rpartition(".")[0]
    ancestors = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    names: list[tuple[str, bool]] = []  # (module, needs its __init__'s names even if an ancestor)
    if isinstance(node, ast.Import):
        names = [(alias.name, False) for alias in node.names]
    else:
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            names.append((sub, False) if sub in modules else (source, True))
    out = set()
    for name, reads_names in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and (prefix not in ancestors or (reads_names and prefix == name)):
                out.add(prefix)
    out.discard(importer)
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """``importer -> {imported module: line of the first such import}`` over the package."""
    modules = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(name, node, modules):
                edges[target] = min(edges.get(target, node.lineno), node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(component: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    root = PACKAGE.parent
    edges = [
        f"    {a} -> {b}  ({modules[a].relative_to(root)}:{line})"
        for a in component
        for b, line in sorted(graph[a].items())
        if b in component
    ]
    return "  cycle " + " <-> ".join(component) + ":\n" + "\n".join(edges)


def test_import_graph_has_no_cycles():
    """No cycle among ``flux_lightning``'s modules: the dependency direction alone orders them.

    Function-level imports count as edges (hiding a cycle inside a function does not remove it)."""
    graph, modules = import_graph(), _modules()
    found = [c for c in cycles(graph) if c not in ALLOWED_CYCLES]
    assert not found, "import cycles (fix the dependency direction):\n" + "\n".join(
        _describe(c, graph, modules) for c in found
    )
    stale = [c for c in ALLOWED_CYCLES if c not in cycles(graph)]
    assert not stale, f"ALLOWED_CYCLES lists cycles that are gone; remove them: {stale}"


def test_the_graph_check_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a cycle hidden in a function, through a package ``__init__`` and a
    ``from .. import`` is found; a parent package importing its children is not a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from .sub import B\nA = 1\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "sub" / "b.py").write_text("B = 2\n\ndef f():\n    from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a": 1} and graph["pkg.a"] == {"pkg.sub": 1}
    assert graph["pkg.sub.b"] == {"pkg.a": 4} and graph["pkg.c"] == {}
    assert cycles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.b"]]
