"""Hydra multirun: one dir per job, caches encoded once, a summary table; the Optuna config runs."""

import os
import subprocess
import sys

import pytest

from flux_lightning.sweep import collect, format_table

COMMON = ["trainer.max_steps=2", "callbacks.validation=null", "callbacks.eval_loss=null", "logger=csv", "dataset.demo_images=4"]


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flux_lightning", "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_grid_sweep_over_lr_and_rank_shares_caches(tmp_path):
    proc = _run(["optimizer.lr=1e-3,2e-3", "adapter.rank=2,4", f"hydra.sweep.dir={tmp_path}/sweep", *COMMON], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1", "2", "3"]
    for j in jobs:
        assert (tmp_path / "sweep" / j / "lora" / "pytorch_lora_weights.safetensors").is_file()
    entries = [p for d in ("vae", "text") for p in (tmp_path / "cache" / d).rglob("*.safetensors")]
    assert len(entries) == 4 + 5  # 4 latents; 4 captions + the empty caption
    second_job_start = (tmp_path / "sweep" / "1" / ".hydra" / "config.yaml").stat().st_mtime
    assert max(p.stat().st_mtime for p in entries) < second_job_start, "a later sweep job re-encoded"
    rows = collect(tmp_path / "sweep")
    assert len(rows) == 4 and rows[0]["metric"] <= rows[-1]["metric"]
    swept = {tuple(o for o in sorted(r["overrides"]) if o.startswith(("optimizer.lr", "adapter.rank"))) for r in rows}
    assert swept == {(f"adapter.rank={r}", f"optimizer.lr={lr}") for lr in ("0.001", "0.002") for r in (2, 4)}
    assert "sweep summary" in proc.stdout and (tmp_path / "sweep" / "summary.md").read_text() == format_table(rows) + "\n"


@pytest.mark.slow
def test_optuna_search_minimises_the_returned_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _run(["+hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/opt", *COMMON], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best parameters" in proc.stdout + proc.stderr
    assert len(collect(tmp_path / "opt")) == 2
