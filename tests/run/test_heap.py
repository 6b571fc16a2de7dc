"""The command line freezes the start-up heap once (flux_lightning/run/heap.py); the library never does."""

from __future__ import annotations

import subprocess
import sys

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
