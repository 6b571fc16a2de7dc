"""The user's path: a real flavour's experiment on a local folder, offline, with the default
callbacks; re-running the same command resumes; one process per run dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux_lightning.model.tiny import ensure_tiny_folder
from flux_lightning.run.rundir import RunDirInUse, acquire

from ..support.cli import flux_lightning

REPO = Path(__file__).resolve().parents[2]


def _env(**extra):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock until it is killed."""
    code = (
        "import sys, time; from flux_lightning.run.rundir import acquire; acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_dir_is_refused_with_the_holders_pid(tmp_path):
    holder = _hold(tmp_path / "run")
    try:
        with pytest.raises(RunDirInUse, match=f"in use by pid {holder.pid}"):
            acquire(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    os.close(acquire(tmp_path / "run"))  # free again once the holder is gone


def test_the_cli_refuses_a_second_run_on_the_same_dir(tmp_path):
    holder = _hold(tmp_path / "outputs" / "runs" / "mine")
    try:
        out = subprocess.run(
            flux_lightning("run_name=mine"),
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2
    assert f"in use by pid {holder.pid}" in out.stderr and "run_name=" in out.stderr
    assert not (tmp_path / "outputs" / "runs" / "mine" / ".hydra").exists(), "Hydra wrote into the held dir"


@pytest.fixture(scope="module")
def dev_layout_folder(tmp_path_factory) -> Path:
    """A local diffusers-format folder with FLUX.1-dev's layout (guidance embedding), tiny weights."""
    return ensure_tiny_folder(tmp_path_factory.mktemp("models"), guidance_embeds=True)


def _krea_cmd(model: Path, images: Path) -> list[str]:
    return flux_lightning(
        "+experiment=krea_lora",
        f"model.pretrained_model_name_or_path={model}",
        f"dataset.instance_data_dir={images}",
        "dataset.instance_prompt=a photo of sks",
        "dataset.resolution=64",
        # CPU: fp32 instead of the experiment's bf16
        "model.dtype=fp32",
        "trainer.precision=32-true",
        "optimizer=adamw",
        "trainer.max_steps=6",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.validation.every_n_steps=3",
        "callbacks.validation.validation_num_inference_steps=2",
        "callbacks.eval_loss.every_n_steps=3",
    )


@pytest.mark.slow
def test_krea_experiment_offline_on_a_local_folder_with_one_image_resumes_when_rerun(tmp_path, dev_layout_folder):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (96, 80), (200, 40, 40)).save(images / "subject.png")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cmd = _krea_cmd(dev_layout_folder, images)

    proc = subprocess.Popen(cmd, cwd=scratch, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = scratch / "outputs" / "runs" / "krea_lora"
    first = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 400
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(first, weights_only=True)["global_step"]
    assert killed_at < 6, "killed too late to test a resume"

    rerun = subprocess.run(cmd, cwd=scratch, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'} (step {killed_at})" in rerun.stdout
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert "CLIP score is off for this run" in rerun.stdout + rerun.stderr  # offline: the flavour's CLIP is optional
    assert list((run_dir / "validation").rglob("*.png")), "validation images were not rendered"


def test_orphaned_children_of_a_killed_run_do_not_keep_its_dir_locked(tmp_path):
    """Dataloader workers are forked: they must not inherit the lock (else a re-run after SIGKILL is
    refused until they notice their parent is gone)."""
    code = (
        "import os, sys, time; from flux_lightning.run.rundir import acquire; acquire(sys.argv[1])\n"
        "if os.fork() == 0:\n    time.sleep(60); os._exit(0)\n"
        "print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunDirInUse):
        acquire(tmp_path)
    proc.kill()
    proc.wait()
    os.close(acquire(tmp_path))  # the forked child still runs, yet the dir is free
