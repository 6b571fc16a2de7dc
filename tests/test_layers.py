"""The layer rule (docs/architecture.md, "Layers"): the library core does not import Hydra, OmegaConf or
the application; written by the relayout script of issue 24 (reads the subpackages from the package)."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import flux_lightning

from .test_imports import PACKAGE, _modules, import_graph

# The library core: a plain ``lightning.Trainer`` runs it (README's "library API").
CORE = {"model", "training", "adapters", "data", "callbacks"}
# The applications built on the core: the Hydra app, the config's Hydra side, the importers, the UIs.
APPLICATION = {"run", "config", "simpletuner", "wizard", "ui", "lora_tools"}
# config/ modules the core may import: none today (validation and the schema read Hydra's nodes).
CORE_SAFE_CONFIG: set[str] = set()
ROOT_LEAVES = {"errors", "values", "atomic_files"}  # the root's modules the core may import
THIRD_PARTY_APP = {"hydra", "omegaconf"}


def _subpackages() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(flux_lightning.__path__) if m.ispkg} - {"conf"}


def test_every_subpackage_is_in_a_layer():
    """A new subpackage is placed in the core or the application (then this file says which)."""
    assert _subpackages() == CORE | APPLICATION, (
        f"subpackages {sorted(_subpackages() - CORE - APPLICATION)} are in no layer; "
        f"missing: {sorted(CORE | APPLICATION - _subpackages())}: add them to CORE or APPLICATION"
    )


def test_the_root_keeps_only_entry_points_and_leaves():
    root = {m.name for m in pkgutil.iter_modules(flux_lightning.__path__) if not m.ispkg}
    assert root <= {"__main__", "cli"} | ROOT_LEAVES, (
        f"move {sorted(root - {'__main__', 'cli'} - ROOT_LEAVES)} into a subpackage"
    )


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _third_party_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module.split(".")[0], node.lineno


def test_the_core_imports_neither_hydra_nor_the_application():
    """model, training, adapters, data, callbacks: no ``hydra``/``omegaconf`` import (function-level
    ones included) and no edge into run, config, simpletuner, wizard, ui or lora_tools."""
    modules = _modules()
    bad = []
    for name, edges in import_graph().items():
        if _layer(name) not in CORE:
            continue
        where = modules[name].relative_to(PACKAGE.parent)
        for target, line in sorted(edges.items()):
            layer = _layer(target)
            if layer in APPLICATION and target not in CORE_SAFE_CONFIG:
                bad.append(f"{where}:{line} imports {target}")
            elif layer is None and target != "flux_lightning" and target.split(".")[-1] not in ROOT_LEAVES:
                bad.append(f"{where}:{line} imports {target} (a root module that is not a leaf)")
        for top, line in _third_party_imports(modules[name]):
            if top in THIRD_PARTY_APP:
                bad.append(f"{where}:{line} imports {top}")
    assert not bad, "the library core reaches into the application:\n" + "\n".join(bad)


def test_the_layer_check_sees_a_violation(tmp_path):
    """The checker itself: a core module importing the app (inside a function) is an edge it reports."""
    pkg = tmp_path / "flux_lightning"
    for sub in ("model", "run"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "run" / "train.py").write_text("X = 1\n")
    (pkg / "model" / "tiny.py").write_text("def f():\n    from ..run import train\n")
    graph = import_graph(pkg)
    assert graph["flux_lightning.model.tiny"] == {"flux_lightning.run": 2, "flux_lightning.run.train": 2}
