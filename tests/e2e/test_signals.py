"""SIGTERM/SIGINT stop a run within seconds with a resumable checkpoint; unreadable checkpoints,
full or read-only disks and finished runs give one line instead of a traceback or a silent redo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_lightning.atomic_files import AtomicCheckpointIO, save_safetensors_atomic

from ..support.cli import run_command

REPO = Path(__file__).resolve().parents[2]
LORA = Path("lora") / "pytorch_lora_weights.safetensors"


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _cmd(run_dir: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    """A quick CLI run: checkpoint every 5 steps, no CLIP / eval / model card, CSV logs, dropout on."""
    return run_command(
        run_dir,
        cache,
        steps,
        "callbacks.model_checkpoint.every_n_train_steps=5",
        "callbacks.clip_score=null",
        "callbacks.eval_loss=null",
        "callbacks.model_card=null",
        "logger=csv",
        "adapter.dropout=0.1",
        *extra,
    )


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, **kw)


def _same_lora(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and len(x) > 0
    differ = [k for k in x if not torch.equal(x[k], y[k])]
    assert not differ, f"{len(differ)} of {len(x)} adapter tensors differ"


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    return last


# -- SIGTERM during validation: out in seconds, and the re-run ends where an uninterrupted run does --

# validation at step 5 only (plus the final one), long enough that the signal lands inside it
LONG_VALIDATION = (
    "callbacks.validation.every_n_steps=5",
    "callbacks.validation.before_training=false",
    "callbacks.validation.validation_num_inference_steps=400",
)


@pytest.mark.slow
def test_sigterm_during_validation_stops_in_seconds_and_the_rerun_resumes_bit_exactly(tmp_path):
    cache, steps = tmp_path / "cache", 8
    straight = tmp_path / "straight"
    done = _run(_cmd(straight, cache, steps, *LONG_VALIDATION))
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = tmp_path / "stopped"
    cmd = _cmd(stopped, cache, steps, *LONG_VALIDATION)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rendering = stopped / "validation" / "step_5"
    deadline = time.monotonic() + 400
    while not rendering.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.3)  # well inside the 400 sampler steps
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert took < 10, f"SIGTERM took {took:.1f}s to stop the run"
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = stopped / "checkpoints" / "last.ckpt"
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM at step 5; re-run the same command to resume from {last}"
    )
    assert not list(rendering.iterdir()), "validation was not interrupted (its image was written)"
    assert _step(last) == 5
    assert not (stopped / "result.json").exists()

    rerun = _run(cmd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {last} (step 5)" in rerun.stdout
    _same_lora(straight / LORA, stopped / LORA)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == steps  # last.ckpt is at the final step in both
    assert a["state_dict"].keys() == b["state_dict"].keys()  # the fp32 adapter, not only the bf16 file
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for p in a["optimizer_states"][0]["state"]:
        for name, v in a["optimizer_states"][0]["state"][p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer_states"][0]["state"][p][name]))


@pytest.mark.slow
def test_sigint_while_caching_stops_before_training_with_one_line(tmp_path):
    """Ctrl+C during the VAE caching loop: out at once, nothing half-written, one line."""
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(400):  # enough batches that caching lasts well past the signal
        Image.new("RGB", (64, 64), (i % 256, 50, 200 - i % 200)).save(images / f"{i}.png")
    cmd = _cmd(
        tmp_path / "run",
        tmp_path / "cache",
        5,
        "dataset=local",
        f"dataset.instance_data_dir={images}",
        "dataset.resolution=64",
        "dataset.vae_batch_size=1",
        "callbacks.validation=null",
    )
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    vae = tmp_path / "cache" / "vae"
    deadline = time.monotonic() + 400
    while (
        not (vae.is_dir() and len(list(vae.rglob("*.safetensors"))) >= 3)
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "stopped by SIGINT before training started; re-run the same command" in err.strip().splitlines()[-1]
    assert len(list(vae.rglob("*.safetensors"))) < 400
    assert not list(vae.rglob("*.tmp")), "a half-written cache entry was left"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stop_flag_raises_only_after_a_signal():
    from flux_lightning.training import stopping

    before = signal.getsignal(signal.SIGTERM)
    stopping.install()
    try:
        stopping.check()  # nothing received: no-op
        stopping.set_immediate(False)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: flag set, no exception (training mode)
        assert stopping.requested() == signal.SIGTERM
        with pytest.raises(stopping.StopRequested) as info:
            stopping.check()
        assert info.value.exit_code == 143
    finally:
        stopping.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


# -- checkpoints: unreadable newest files are skipped, no -v1 copies, a finished run stays finished --


@pytest.mark.slow
def test_truncated_last_and_empty_newest_step_checkpoint_fall_back_without_v1_copies(tmp_path):
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    cmd = _cmd(run, cache, 10, "callbacks.validation=null")
    first = _run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = tmp_path / "reference.safetensors"
    shutil.copyfile(run / LORA, reference)
    ckpts = run / "checkpoints"
    # the run "died" while its storage tore the newest files: last.ckpt truncated, step 10 empty
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    (ckpts / "step000010.ckpt").write_bytes(b"")
    (run / "result.json").unlink()

    rerun = _run(cmd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {ckpts / 'step000005.ckpt'} (step 5)" in rerun.stdout
    log = rerun.stdout + rerun.stderr + (run / "train.log").read_text()
    assert "skipping unreadable last.ckpt" in log and "step000010.ckpt (empty file)" in log
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step000005.ckpt", "step000010.ckpt"]
    assert _step(ckpts / "step000010.ckpt") == _step(ckpts / "last.ckpt") == 10
    _same_lora(reference, run / LORA)  # the resumed run ends where the uninterrupted one did


def test_an_unreadable_explicit_checkpoint_is_one_line(tmp_path):
    from flux_lightning.config.validation import ConfigError
    from flux_lightning.run.train import resolve_checkpoint

    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match=r"x.ckpt is unreadable .*; give another .ckpt file, latest or null"):
        resolve_checkpoint(str(bad), str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no checkpoint in .* is readable \(last.ckpt \(empty file\)\)"):
        resolve_checkpoint("latest", str(tmp_path))


@pytest.mark.slow
def test_rerunning_a_finished_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    cmd = _cmd(run, tmp_path / "cache", 5, "callbacks.validation=null")
    assert _run(cmd).returncode == 0
    before = {p: p.read_bytes() for p in (run / "result.json", run / LORA, run / "checkpoints" / "last.ckpt")}
    assert json.loads((run / "result.json").read_text())["metric"] == pytest.approx(
        json.loads((run / "result.json").read_text())["train_loss"]
    )
    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        again.stdout.strip()
        .splitlines()[-1]
        .startswith(f"run {run} already finished at step 5; nothing to do (run_name=<new> for a new run")
    ), again.stdout[-2000:]
    assert {p: p.read_bytes() for p in before} == before, "the finished run's files changed"
    result = json.loads((run / "result.json").read_text())
    assert result["metric"] == result["metric"], "NaN metric"  # noqa: PLR0124


# -- storage: a full disk and a read-only dir are one line; the previous checkpoint and LoRA survive --


def test_a_full_disk_is_one_line_naming_the_dir_and_keeps_the_old_file(tmp_path, monkeypatch):
    """The kernel's own ENOSPC: the temporary file is opened on /dev/full (every write fails)."""
    from flux_lightning.errors import StorageError

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    real = os.fdopen

    def full(fd, *a, **k):
        os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return real(fd, *a, **k)

    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(StorageError) as info:
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "x": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    message = str(info.value)
    assert message == (
        f"cannot write last.ckpt in {tmp_path} (No space left on device); free space there, then re-run the "
        "same command (the previous file there is intact)"
    )
    assert info.value.__suppress_context__ and info.value.__cause__ is None  # no chained tracebacks
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return (
        shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_keeps_the_checkpoint_and_lora(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "24m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        run = disk / "run"
        first = _run(_cmd(run, tmp_path / "cache", 5, "callbacks.validation=null"))
        assert first.returncode == 0, first.stderr[-3000:]
        keep = {p: p.read_bytes() for p in (run / LORA, run / "checkpoints" / "last.ckpt")}
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as f:  # leave 24 KiB: room for logs, not for a LoRA or checkpoint
            f.write(b"\0" * (free - 24 * 1024))
        full = _run(_cmd(run, tmp_path / "cache", 10, "callbacks.validation=null"))
        assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
        last = _one_line_error(full)
        assert "No space left on device" in last and str(run / "checkpoints") in last, last
        assert {p: p.read_bytes() for p in keep} == keep, "the previous checkpoint or LoRA changed"
        assert not list(run.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def _without_dac_override() -> list[str] | None:
    """Root ignores permission bits (CAP_DAC_OVERRIDE); dropping that capability makes a chmod'ed
    dir really read-only for the child, as it is for any other user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override", "--"]


def _chmod_tree(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | 0o200 if writable else mode & ~0o222)


@pytest.mark.slow
def test_a_read_only_run_dir_is_one_line_and_keeps_the_checkpoint_and_lora(tmp_path):
    prefix = _without_dac_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: a chmod'ed dir would still be writable")
    run = tmp_path / "run"
    cmd = _cmd(run, tmp_path / "cache", 5, "callbacks.validation=null")
    assert _run(cmd).returncode == 0
    keep = {p: p.read_bytes() for p in (run / LORA, run / "checkpoints" / "last.ckpt")}
    more = _cmd(run, tmp_path / "cache", 10, "callbacks.validation=null")
    try:
        # the checkpoint and LoRA folders read-only (training starts, the first save fails) ...
        _chmod_tree(run / "checkpoints", False)
        _chmod_tree(run / "lora", False)
        proc = _run(prefix + more)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        last = _one_line_error(proc)
        assert "Permission denied" in last and str(run / "checkpoints") in last, last
        assert {p: p.read_bytes() for p in keep} == keep
        # ... and the whole run dir read-only (refused before anything is written)
        _chmod_tree(run, False)
        proc = _run(prefix + more)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = _one_line_error(proc)
        assert f"cannot write to run dir {run} (Permission denied)" in last, last
        assert {p: p.read_bytes() for p in keep} == keep
    finally:
        _chmod_tree(run, True)


def test_safetensors_write_errors_are_one_line(tmp_path):
    from flux_lightning.errors import StorageError

    target = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    save_safetensors_atomic({"a": torch.zeros(2)}, target)
    bad = tmp_path / "file-not-dir"
    bad.write_text("x")
    with pytest.raises(StorageError, match=r"cannot write x.safetensors in .*file-not-dir \(File exists\)"):
        save_safetensors_atomic({"a": torch.zeros(2)}, bad / "x.safetensors")
    assert load_file(target)["a"].shape == (2,)


@pytest.mark.parametrize("when", ["created", "written"])
def test_a_stop_signal_while_a_temporary_file_is_created_or_written_leaves_no_tmp(tmp_path, monkeypatch, when):
    """The stop handler raises at once before training (caching); a signal that lands just after
    mkstemp (seen under load: a .tmp left in the VAE cache) or during the write removes the file."""
    import os as os_

    from flux_lightning import atomic_files

    class Stop(BaseException):
        pass

    def raise_stop(signum, frame):
        raise Stop()

    previous = signal.signal(signal.SIGINT, raise_stop)
    try:
        if when == "created":
            real_fchmod = os_.fchmod

            def fchmod_then_signal(fd, mode):
                real_fchmod(fd, mode)
                os_.kill(os_.getpid(), signal.SIGINT)  # delivered right here unless held

            monkeypatch.setattr(atomic_files.os, "fchmod", fchmod_then_signal)
        else:
            import safetensors.torch

            def save_file_then_signal(tensors, filename, metadata=None):
                with open(filename, "wb") as f:
                    f.write(b"half")
                os_.kill(os_.getpid(), signal.SIGINT)

            monkeypatch.setattr(safetensors.torch, "save_file", save_file_then_signal)
        with pytest.raises(Stop):
            save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "entry.safetensors")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_inside_one_long_c_call_before_training_stops_within_seconds(tmp_path):
    """Python runs handlers between bytecodes only; the watchdog (wakeup fd) ends the process
    GRACE_S after the signal with the usual line and exit code, the written entries kept, no .tmp."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "support" / "stop_during_long_op.py"), str(tmp_path / "vae")],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "busy", proc.communicate()[1][-3000:]
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    assert took < 30, f"SIGTERM took {took:.1f}s"  # GRACE_S (5 s) plus a loaded machine's slack
    assert "long call ended" not in out
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM before training started")
    assert sorted(p.suffix for p in (tmp_path / "vae").rglob("*") if p.is_file()) == [".safetensors"] * 3
