"""Two CPU processes (DDP over gloo) train the same adapter as one process with the same global batch;
the README's DDP command ends cleanly on both ranks and stops on SIGTERM with one checkpoint."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import REPO

ACCUMULATIONS = (1, 2)


def _run(out, cache, devices, batch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    accumulations = ",".join(map(str, ACCUMULATIONS))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "support" / "ddp_script.py"),
            str(out),
            str(cache),
            str(devices),
            str(batch),
            accumulations,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
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
            torch.testing.assert_close(
                r0[k], single[k], atol=1e-5, rtol=1e-4, msg=lambda m, acc=acc: f"accumulate {acc}: {m}"
            )
        moved = [k for k in r0 if "lora_B" in k and r0[k].abs().max() > 0]
        assert moved, "training did not change the adapter"
    accumulated = load_file(tmp_path / "single" / "rank0_of_1_acc2.safetensors")
    plain = load_file(tmp_path / "single" / "rank0_of_1_acc1.safetensors")
    assert any(not torch.allclose(accumulated[k], plain[k], atol=1e-4) for k in plain), "accumulation changed nothing"


README_DDP = "python -m flux_lightning trainer=ddp trainer.accelerator=cpu trainer.devices=2 dataset.batch_size=2"
# small and quick: 4 images of 64 px (one global batch of 2 x 2), no evaluation
QUICK = [
    "dataset.demo_images=4",
    "callbacks.validation=null",
    "callbacks.eval_loss=null",
    "callbacks.clip_score=null",
    "logger=csv",
]


def _cli(tmp_path, *extra) -> list[str]:
    assert README_DDP in " ".join((REPO / "README.md").read_text().split()), "the README's DDP command changed"
    return [
        sys.executable,
        *shlex.split(README_DDP)[1:],
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *QUICK,
        *extra,
    ]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_the_readmes_ddp_command_ends_cleanly_on_both_ranks_and_a_rerun_is_finished(tmp_path):
    """Through the CLI, 2 CPU processes: the end-of-run summary, result.json, the LoRA and the model card;
    exit 0, which the first process returns only when the rank it started exited 0 too."""
    cmd = _cli(tmp_path, "trainer.max_steps=3")
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 3 and result["summary"]["strategy"] == "ddp"
    assert result["summary"]["devices"] == "2 x cpu [0, 1]"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and (run / "lora" / "README.md").is_file()
    assert (run / "train_ddp_process_1.log").is_file()  # the second rank, started by Lightning
    assert "strategy" in proc.stdout and "Traceback" not in proc.stderr
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run {run} already finished at step 3; nothing to do" in again.stdout


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_sigterm_to_the_first_process_stops_both_ranks_at_one_step_with_one_last_ckpt(tmp_path):
    """SIGTERM to the process the user started: Lightning forwards it to the rank it started, the ranks
    agree at the end of a step to stop there, ``last.ckpt`` is written (by rank 0) at that step, and
    both processes exit: 128 + SIGTERM, with the one-line message."""
    proc = subprocess.Popen(
        _cli(tmp_path, "trainer.max_steps=100000", "callbacks.model_checkpoint.every_n_train_steps=2"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 400
    while not (ckpts / "step000002.ckpt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    ranks = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    last = ckpts / "last.ckpt"
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert (
        err.strip().splitlines()[-1]
        == f"stopped by SIGTERM at step {step}; re-run the same command to resume from {last}"
    )
    deadline = time.monotonic() + 60  # the rank Lightning started leaves just after the first process
    while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ranks and not any(_alive(p) for p in ranks), "the second rank is still running"
    assert not (tmp_path / "run" / "result.json").exists()
