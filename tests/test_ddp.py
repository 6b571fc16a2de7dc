"""Two CPU processes (DDP over gloo) train the same adapter as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO


def _run(out, cache, devices, batch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_script.py"), str(out), str(cache), str(devices), str(batch)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_match_each_other_and_a_single_process(tmp_path):
    cache = tmp_path / "cache"
    _run(tmp_path / "single", cache, 1, 2)
    _run(tmp_path / "ddp", cache, 2, 1)
    single = load_file(tmp_path / "single" / "rank0_of_1.safetensors")
    r0 = load_file(tmp_path / "ddp" / "rank0_of_2.safetensors")
    r1 = load_file(tmp_path / "ddp" / "rank1_of_2.safetensors")
    assert r0.keys() == r1.keys() == single.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged at {k}"
        torch.testing.assert_close(r0[k], single[k], atol=1e-5, rtol=1e-4)
    moved = [k for k in r0 if "lora_B" in k and r0[k].abs().max() > 0]
    assert moved, "training did not change the adapter"
