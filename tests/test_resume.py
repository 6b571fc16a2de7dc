"""Checkpoints: adapter-only, atomic, and a resume after SIGKILL gives the uninterrupted run's LoRA."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_lightning.checkpointing import AtomicCheckpointIO


def _cmd(run_dir: Path, cache: Path, steps: int = 40) -> list[str]:
    return [
        sys.executable, "-m", "flux_lightning",
        f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}",
        f"trainer.max_steps={steps}", "callbacks.model_checkpoint.every_n_train_steps=5",
        "callbacks.validation=null", "logger=csv", "adapter.dropout=0.1",
    ]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight, cache), check=True, env=_env(), capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, cache), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert 0 < ckpt["global_step"] < 40
    rerun = subprocess.run(_cmd(killed, cache), env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "steps" in rerun.stdout and "40" in rerun.stdout

    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(killed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs from the uninterrupted one"

    # checkpoints hold the adapter, optimizer, scheduler, loops, sampler position and RNG: no base weights
    final = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(".lora_" in k for k in final["state_dict"])
    assert "rng_states" in final
    sampler_state = next(v for k, v in final.items() if k.endswith("FluxDataModule"))
    assert set(sampler_state["sampler"]) >= {"epoch", "position"}
    adapter = sum(v.numel() * v.element_size() for v in final["state_dict"].values())
    optim = sum(
        v.numel() * v.element_size()
        for s in final["optimizer_states"][0]["state"].values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    size = (straight / "checkpoints" / "last.ckpt").stat().st_size
    assert size < 2 * (adapter + optim), (size, adapter, optim)
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step*.ckpt"))
    assert len(kept) == 5  # checkpoints_total_limit (save_top_k) keeps the newest five


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def dies(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
