"""Two CPU processes (DDP over gloo) train the same adapter as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO


ACCUMULATIONS = (1, 2)


def _run(out, cache, devices, batch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    accumulations = ",".join(map(str, ACCUMULATIONS))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_script.py"), str(out), str(cache), str(devices), str(batch), accumulations],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_match_each_other_and_a_single_process(tmp_path):
    """2 processes x batch 1 make the update of 1 process x batch 2 on the same samples, with and
    without gradient accumulation: rank r takes slot r of each global batch (the sampler), its noise
    is keyed by the sample's global index (rank x batch + j), DDP averages the ranks' gradients of
    their per-batch mean losses. Equal up to fp32 reduction order (DDP's all-reduce sums in another
    order than the batch mean), after 6 AdamW steps."""
    cache = tmp_path / "cache"
    _run(tmp_path / "single", cache, 1, 2)
    _run(tmp_path / "ddp", cache, 2, 1)
    for acc in ACCUMULATIONS:
        single = load_file(tmp_path / "single" / f"rank0_of_1_acc{acc}.safetensors")
        r0 = load_file(tmp_path / "ddp" / f"rank0_of_2_acc{acc}.safetensors")
        r1 = load_file(tmp_path / "ddp" / f"rank1_of_2_acc{acc}.safetensors")
        assert r0.keys() == r1.keys() == single.keys()
        for k in r0:
            assert torch.equal(r0[k], r1[k]), f"ranks diverged at {k} (accumulate {acc})"
            torch.testing.assert_close(r0[k], single[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"accumulate {acc}: {m}")
        moved = [k for k in r0 if "lora_B" in k and r0[k].abs().max() > 0]
        assert moved, "training did not change the adapter"
    accumulated = load_file(tmp_path / "single" / "rank0_of_1_acc2.safetensors")
    plain = load_file(tmp_path / "single" / "rank0_of_1_acc1.safetensors")
    assert any(not torch.allclose(accumulated[k], plain[k], atol=1e-4) for k in plain), "accumulation changed nothing"
