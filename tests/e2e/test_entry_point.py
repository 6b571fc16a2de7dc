"""The entry point only composes, validates, instantiates and fits: the module, the datamodule and
the trainer are ``_target_`` nodes a user can point at their own classes from the command line."""

import os
import re
import subprocess
from pathlib import Path

from flux_lightning.run.train import _train

from ..support.cli import flux_lightning

TESTS = Path(__file__).resolve().parents[1] / "support"


def test_a_users_module_and_datamodule_subclasses_are_swapped_in_from_the_command_line(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = flux_lightning(
        "module._target_=custom_parts.CountingModule",
        "+module.tag=mine",
        "data._target_=custom_parts.CountingData",
        "+data.tag=ours",
        "trainer.max_steps=3",
        "callbacks.validation=null",
        "callbacks.clip_score=null",
        "callbacks.eval_loss=null",
        f"paths.cache_dir={tmp_path}/cache",
    )
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the typed parts arrive as the library's dataclasses; Lightning trained with both subclasses
    assert re.search(r"^custom module\s+ModelConfig mine 3 steps$", proc.stdout, re.M), proc.stdout[-2000:]
    served = re.search(r"^custom data\s+DatasetConfig ours (\d+) batches$", proc.stdout, re.M)
    assert served and int(served.group(1)) >= 3, proc.stdout[-2000:]  # Lightning fetches one batch ahead


def test_the_entry_point_names_no_class_it_builds():
    """train.py wires nothing by type: it imports none of the module, datamodule or callback
    classes and checks no part's type; the parts meet through duck-typed hooks."""
    import ast

    import flux_lightning
    import flux_lightning.callbacks

    ours = {*flux_lightning.__all__, *flux_lightning.callbacks.__all__}
    tree = ast.parse(Path(_train.__code__.co_filename).read_text())
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    checked = {
        ast.unparse(n.args[1])
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "isinstance"
    }
    assert not imported & ours and not {c for c in checked if c in ours}, (imported & ours, checked)
