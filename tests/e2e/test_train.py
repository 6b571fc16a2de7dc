"""End to end: the embedded default run, and `train()` driven by a composed config."""

import csv
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from flux_lightning.run.train import config_dir, train

from ..support.cli import flux_lightning


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _scalars(log_dir: Path, tag: str) -> list[float]:
    return [e.value for e in _events(log_dir).Scalars(tag)]


@pytest.mark.slow
def test_default_run_trains_the_tiny_demo_in_minutes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # how long it takes is a benchmark (benchmarks/README.md, "The embedded demo"), not a timed test
    proc = subprocess.run(flux_lightning(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    noise = [
        line
        for line in (out + proc.stderr).splitlines()
        if re.search(r"Tip:|LeafSpec|`weights_only` was not set|gemm_4bit_forward", line)
    ]
    assert not noise, f"third-party noise on the console: {noise}"
    run_dir = Path(re.search(r"^run dir\s+(.+)$", out, re.M).group(1))
    lora = Path(re.search(r"^adapter\s+(.+)$", out, re.M).group(1))
    assert lora == run_dir / "lora" / "pytorch_lora_weights.safetensors" and lora.is_file()
    with safe_open(lora, "pt") as f:
        assert len(list(f.keys())) > 0
    validation = run_dir / "validation"
    for step in (0, 100, 200, 300):  # baseline, intermediate, final
        assert (validation / f"step_{step}" / "validation_64x64.png").is_file(), step
    events = _events(run_dir / "tensorboard")
    assert [e.step for e in events.Images("validation/images")] == [0, 100, 200, 300]
    for tag in ("clip/mean", "clip/min", "clip/max", "clip/std", "clip/prompt/validation", "loss/val"):
        assert [e.step for e in events.Scalars(tag)] == [0, 100, 200, 300], tag
    assert len([t for t in events.Tags()["scalars"] if t.startswith("loss/val/sigma/")]) == 8
    eval_losses = [e.value for e in events.Scalars("loss/val")]
    assert eval_losses[-1] < eval_losses[0]
    final_eval = float(re.search(r"^final eval loss\s+(\S+)$", out, re.M).group(1))
    assert abs(final_eval - eval_losses[-1]) < 1e-4
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    losses = _scalars(run_dir / "tensorboard", "loss/train")
    tenth = max(1, len(losses) // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    assert last < first, (first, last)
    assert (tmp_path / "cache" / "vae").is_dir(), "caches belong outside the run dir"
    assert run_dir.resolve() == (tmp_path / "outputs" / "runs" / "demo").resolve(), "the demo's run dir is stable"
    result = (run_dir / "result.json").read_bytes()
    again = subprocess.run(flux_lightning(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # the same command on the finished run: one line, nothing retrained or rewritten
    assert "already finished at step 300; nothing to do" in again.stdout, again.stdout[-2000:]
    assert (run_dir / "result.json").read_bytes() == result


def test_train_returns_the_final_loss_and_caches_are_shared(tmp_path):
    overrides = [
        f"paths.output_dir={tmp_path}/run1",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_steps=3",
        "callbacks.validation.every_n_steps=2",
        "adapter.rank=4",
        "logger=csv",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        cfg2 = compose("train", overrides=[o.replace("run1", "run2") for o in overrides])
    loss = train(cfg)
    assert math.isfinite(loss) and loss > 0
    with open(tmp_path / "run1" / "csv" / "metrics.csv") as f:
        eval_losses = [float(row["loss/val"]) for row in csv.DictReader(f) if row.get("loss/val")]
    assert len(eval_losses) == 2 and loss == pytest.approx(eval_losses[-1]), "train() returns the final eval loss"
    steps = sorted(p.name for p in (tmp_path / "run1" / "validation").iterdir())
    assert steps == ["step_0", "step_2", "step_3"]
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in entries]
    train(cfg2)
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == entries
    assert [p.stat().st_mtime_ns for p in entries] == mtimes, "the second run re-encoded"
    assert (tmp_path / "run2" / "lora" / "pytorch_lora_weights.safetensors").is_file()
