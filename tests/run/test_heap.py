"""The command line freezes the start-up heap once (flux_lightning/run/heap.py); the library never does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flux_lightning.run.heap import command_module

from ..conftest import REPO

# The job function is replaced by one that reports the collector's permanent generation: Hydra
# composes the default config and starts the job as `python -m flux_lightning` does, nothing trains.
_CODE = """
import gc, sys
import flux_lightning.run.train as t
assert gc.get_freeze_count() == 0, "importing the library froze the heap"
seen = []
def fake_train(cfg):
    seen.append(gc.get_freeze_count())
    return 0.0
t.train = fake_train
sys.argv = ["flux_lightning", "hydra.run.dir=" + sys.argv[1], "hydra.output_subdir=null", "hydra/job_logging=disabled"]
t.main()
print("frozen", seen[0], "again", t.freeze_startup_heap())
"""


def test_the_first_job_freezes_the_imported_modules_once(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _CODE, str(tmp_path / "run")], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1].split()
    assert line[0] == "frozen" and int(line[1]) > 100_000, line  # the imported modules' objects
    assert line[2:] == ["again", "False"]  # once per process: a sweep's later jobs freeze nothing


@pytest.mark.parametrize(
    "orig_argv, argv, expected",
    [
        (["python", "-m", "flux_lightning", "trainer.max_steps=3"], ["-m"], "flux_lightning"),
        (["python", "-X", "importtime", "-m", "flux_lightning.wizard"], ["-m"], "flux_lightning.wizard"),
        (["python", "-m", "flux_lightning"], ["/x/flux_lightning/__main__.py"], None),  # located: the run itself
        (["python", "-c", "import flux_lightning", "-m"], ["-c"], None),
        (["python", "train.py", "-m", "flux_lightning"], ["train.py"], None),
        (["python", "-m", "pytest", "tests"], ["-m"], "pytest"),
    ],
)
def test_command_module_is_read_while_python_locates_it(orig_argv, argv, expected):
    assert command_module(orig_argv, argv) == expected


# `python -m <module>` as Python sees it while it imports the module's package: sys.argv[0] == "-m"
_IMPORT = """
import gc, sys
sys.orig_argv = [sys.executable, "-m", sys.argv[1]]
sys.argv = ["-m"]
paused = []
gc.callbacks.append(lambda phase, info: paused.append(phase))
import flux_lightning
print(gc.isenabled(), gc.get_freeze_count(), len(paused))
"""


@pytest.mark.parametrize(
    "module, frozen", [("flux_lightning", True), ("flux_lightning.wizard", True), ("other", False)]
)
def test_our_commands_import_without_the_cyclic_collector(module, frozen):
    """Our commands import with the collector paused, collect once and freeze; anything else importing
    the library (another -m tool here) keeps its collector as it was."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT, module], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    enabled, freeze_count, collections = proc.stdout.split()
    assert enabled == "True"
    if frozen:
        assert int(freeze_count) > 100_000
        assert int(collections) == 2  # one collection (start + stop): the one after the imports
    else:
        assert int(freeze_count) == 0 and int(collections) > 2
