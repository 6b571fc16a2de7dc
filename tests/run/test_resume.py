"""Checkpoints: adapter-only, atomic, and a resume after SIGKILL gives the uninterrupted run's LoRA."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_lightning.atomic_files import AtomicCheckpointIO

from ..support.cli import run_command


def _cmd(run_dir: Path, cache: Path, steps: int = 40) -> list[str]:
    return run_command(
        run_dir,
        cache,
        steps,
        "callbacks.model_checkpoint.every_n_train_steps=5",
        "callbacks.validation=null",
        "logger=csv",
        "adapter.dropout=0.1",
    )


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


# -- SIGKILL right after a checkpoint at chosen positions (epoch end, mid-epoch, with accumulation) ----


def _every_step(run_dir: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    """A CLI command that checkpoints after every optimizer step and keeps every checkpoint."""
    return run_command(
        run_dir,
        cache,
        steps,
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.validation=null",
        "callbacks.clip_score=null",
        "callbacks.model_card=null",
        "logger=csv",
        "adapter.dropout=0.1",
        *extra,
    )


def _kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start ``cmd``, SIGKILL it as soon as the checkpoint of ``step`` is written (step file and
    last.ckpt), and leave ``last.ckpt`` at exactly that step: if the process got further before the
    kill landed, the later checkpoints are removed as if it had died right after ``step``."""
    ckpts = run_dir / "checkpoints"
    target, last = ckpts / f"step{step:06d}.ckpt", ckpts / "last.ckpt"
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if target.exists() and last.exists() and last.stat().st_mtime_ns >= target.stat().st_mtime_ns:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-3000:]!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    if torch.load(last, map_location="cpu", weights_only=True)["global_step"] != step:
        shutil.copyfile(target, last)
        for later in ckpts.glob("step*.ckpt"):
            if int(later.stem[4:]) > step:
                later.unlink()


def _assert_same_training_state(a: Path, b: Path) -> None:
    """Every adapter tensor and every optimizer state tensor of two checkpoints is identical."""
    x = torch.load(a, map_location="cpu", weights_only=True)
    y = torch.load(b, map_location="cpu", weights_only=True)
    assert (x["global_step"], x["epoch"]) == (y["global_step"], y["epoch"]), (a.name, x["epoch"], y["epoch"])
    assert x["state_dict"].keys() == y["state_dict"].keys() and len(x["state_dict"]) > 0
    differ = [k for k in x["state_dict"] if not torch.equal(x["state_dict"][k], y["state_dict"][k])]
    assert not differ, f"{a.name}: {len(differ)} of {len(x['state_dict'])} adapter tensors differ"
    sx, sy = x["optimizer_states"][0]["state"], y["optimizer_states"][0]["state"]
    assert sx.keys() == sy.keys()
    for p in sx:
        assert sx[p].keys() == sy[p].keys()
        for name, v in sx[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sy[p][name])), (a.name, p, name)


def _five_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90)).save(folder / f"{i}.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,steps,kills",
    [
        # the default demo: 16 images, batch 4 = 4 batches per epoch; kill on epoch 0's last batch, then mid-epoch 1
        ("demo", 10, (4, 6)),
        # 5 local images, batch 1, accumulating 2 batches = 3 optimizer steps per epoch (2 + 2 + 1 batches),
        # 2 persistent dataloader workers (the GPU default): kill on epoch 0's last batch (step 3), then mid-epoch 1
        ("folder_accumulate", 8, (3, 4)),
    ],
)
def test_sigkill_at_epoch_ends_and_mid_epoch_resumes_bit_exactly(tmp_path, case, steps, kills):
    cache = tmp_path / "cache"
    extra = ("dataset.demo_images=16",)  # below eval_min_images: no eval split, all 16 train
    if case == "folder_accumulate":
        extra = (
            "dataset=local",
            f"dataset.instance_data_dir={_five_images(tmp_path / 'images')}",
            "dataset.resolution=64",
            "trainer.accumulate_grad_batches=2",
            "dataset.num_workers=2",
        )
    straight = tmp_path / "straight"
    done = subprocess.run(
        _every_step(straight, cache, steps, *extra), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    cmd = _every_step(killed, cache, steps, *extra)
    for step in kills:  # kill, re-run the same command (it resumes from last.ckpt), kill again, ...
        _kill_after_checkpoint(cmd, killed, step)
        _assert_same_training_state(
            straight / "checkpoints" / f"step{step:06d}.ckpt", killed / "checkpoints" / "last.ckpt"
        )
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # a mid-epoch resume: Lightning's "dataloader is not resumable" would be a false alarm (the sampler resumes)
    assert "dataloader is not resumable" not in rerun.stderr

    for step in range(kills[0] + 1, steps + 1):  # every checkpoint written after a resume equals the straight run's
        _assert_same_training_state(
            straight / "checkpoints" / f"step{step:06d}.ckpt", killed / "checkpoints" / f"step{step:06d}.ckpt"
        )
    _assert_same_training_state(straight / "checkpoints" / "last.ckpt", killed / "checkpoints" / "last.ckpt")
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(killed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
