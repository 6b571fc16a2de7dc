"""The command line's start-up runs without the cyclic collector's full walks (flux_lightning/run/heap.py):
full collections are postponed from the entry point's imports to the first batch, the
imported modules are frozen, and the library never touches the collector."""

from __future__ import annotations

import functools
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flux_lightning.run import heap

from ..conftest import REPO
from ..support.cli import run_command

SUPPORT = Path(__file__).resolve().parents[1] / "support"


def _python(code: str, *args) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@functools.cache
def usual() -> str:
    """A fresh interpreter's collector thresholds, as printed: ``(700, 10, 10)`` on CPython 3.11."""
    return _python("import gc; print(gc.get_threshold())").strip()


def test_the_cli_postpones_full_collections_until_the_first_batch(tmp_path):
    """``python -m flux_lightning`` as a user runs it, with a callback reporting the collector's state:
    frozen imports and no full collections during the set-up, the usual thresholds from the first batch."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(REPO)])}
    cmd = run_command(
        tmp_path / "run",
        tmp_path / "cache",
        3,
        "+callbacks.probe._target_=custom_parts.CollectorProbe",
        "callbacks.validation=null",
        "callbacks.clip_score=null",
        "callbacks.eval_loss=null",
    )
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pattern = r"\bgc (\w+) ([01]) (\d+) (\d+) (\d+) (\d+)$"
    seen = {m[0]: (m[1] == "1", m[2:5], int(m[5])) for m in re.findall(pattern, proc.stdout, re.M)}
    assert sorted(seen) == ["batch0", "batch1", "batch2", "setup"], proc.stdout[-2000:]
    assert seen["setup"][0] and seen["setup"][2] > 100_000, seen  # postponed; the imports frozen
    assert not seen["batch0"][0] and not seen["batch2"][0], seen  # the collector as usual from the first batch
    assert seen["batch0"][1] == seen["batch2"][1] == tuple(usual().strip("()").split(", ")), seen
    if sys.version_info < (3, 14):  # 3.14's incremental collector ignores the third threshold
        assert int(seen["setup"][1][2]) > 10**6, seen


def test_the_library_import_leaves_the_collector_alone():
    out = _python(
        "import gc; from flux_lightning import FluxLoRAModule, FluxDataModule; import flux_lightning.run.train\n"
        "print(gc.get_threshold(), gc.get_freeze_count())"
    )
    assert out.strip() == f"{usual()} 0"


def test_the_tools_collect_as_usual_after_their_imports():
    """``flux-lightning lora|configure|ui`` train nothing: the postponement ends with their imports."""
    out = _python(
        "import gc, sys\n"
        "import flux_lightning.lora_tools.cli as tools\n"
        "tools.main = lambda argv: print(gc.get_threshold(), gc.get_freeze_count() > 0) or 0\n"
        "from flux_lightning.cli import main\n"
        "sys.argv = ['flux-lightning', 'lora', '--help']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code)"
    )
    assert out.split("\n")[:2] == [f"{usual()} True", "exit 0"], out


def test_an_import_error_ends_the_postponement_and_freezes_nothing():
    out = _python(
        "import gc\n"
        "from flux_lightning.run.heap import startup_imports, postponed\n"
        "gc.set_threshold(500, 7, 3)\n"
        "inside = []\n"
        "try:\n"
        "    with startup_imports():\n"
        "        inside.append((gc.get_threshold()[2] > 10**6, postponed()))\n"
        "        raise ImportError('no such package')\n"
        "except ImportError:\n"
        "    pass\n"
        "print(inside[0], gc.get_threshold(), gc.get_freeze_count(), postponed())"
    )
    assert out.strip() == "(True, True) (500, 7, 3) 0 False", out


@pytest.fixture
def restore_collector():
    thresholds = gc.get_threshold()
    yield
    heap._state["thresholds"] = None
    gc.set_threshold(*thresholds)


def test_a_job_that_ends_before_any_step_ends_the_postponement(restore_collector, tmp_path):
    """``train()`` resumes full collections however the job ends (here: a config error, no trainer)."""
    from omegaconf import OmegaConf

    from flux_lightning.errors import ConfigError
    from flux_lightning.run.train import train

    heap._state["thresholds"] = gc.get_threshold()
    gc.set_threshold(700, 10, 1 << 30)
    with pytest.raises(ConfigError, match="unknown config key"):
        train(OmegaConf.create({"not_a_field": 1}))
    assert not heap.postponed() and gc.get_threshold()[2] < 10**6


def test_ending_the_postponement_frees_the_set_ups_cyclic_garbage(restore_collector):
    """A cycle that outlived the young collections and then became garbage (say a pipeline of the
    before-training baselines) is freed when the first batch arrives, not at some later collection."""
    import weakref

    class Node:
        pass

    heap._state["thresholds"] = gc.get_threshold()
    gc.set_threshold(700, 10, 1 << 30)
    node = Node()
    node.me = node
    alive = weakref.ref(node)
    gc.collect(1)  # survives the young generations: now in the old one
    del node
    gc.collect(1)
    assert alive() is not None  # garbage the young collections do not reach
    heap.resume_full_collections()
    assert alive() is None and not heap.postponed()
