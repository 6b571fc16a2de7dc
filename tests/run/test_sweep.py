"""Hydra multirun: one dir per job, caches encoded once, a summary table; the Optuna config runs."""

import os
import subprocess

import pytest

from flux_lightning.run.sweep import collect, format_table

from ..support.cli import flux_lightning

COMMON = [
    "trainer.max_steps=2",
    "callbacks.validation=null",
    "callbacks.eval_loss=null",
    "logger=csv",
    "dataset.demo_images=4",
]


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        flux_lightning("-m", *args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


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
    assert (
        "sweep summary" in proc.stdout and (tmp_path / "sweep" / "summary.md").read_text() == format_table(rows) + "\n"
    )


@pytest.mark.slow
def test_optuna_search_minimises_the_returned_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _run(
        ["+hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/opt", *COMMON], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best parameters" in proc.stdout + proc.stderr
    assert len(collect(tmp_path / "opt")) == 2


@pytest.mark.slow
def test_a_sweep_in_the_default_dir_outlasting_a_second_ends_with_its_summary_and_a_failed_job(tmp_path):
    """The default ``hydra.sweep.dir`` (``outputs/multirun/${run_name}/<date>_<h-m-s>``), jobs that start
    seconds apart, one that diverges (lr 1e30: the non-finite guard stops it, exit 3 alone): the
    sweep goes on, ends with summary.md in the jobs' dir, the failed job listed as failed, exit 1."""
    proc = _run(
        ["optimizer.lr=1e-3,1e30", "nonfinite_max_consecutive=1", "trainer.log_every_n_steps=1", *COMMON], tmp_path
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert [p.relative_to(tmp_path / "outputs" / "multirun").parts[0] for p in sweeps] == ["demo"], sweeps
    sweep = sweeps[0]
    started = [(sweep / j / ".hydra" / "config.yaml").stat().st_mtime for j in ("0", "1")]
    assert started[1] - started[0] >= 1.0, "the jobs did not outlast a clock second"
    rows = collect(sweep)
    assert [(r["job"], r.get("status")) for r in rows] == [("0", None), ("1", "failed")]
    assert (sweep / "summary.md").read_text() == format_table(rows) + "\n"
    assert "sweep summary" in proc.stdout and "| 1 | optimizer.lr=1e+30" in proc.stdout and "| failed |" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 sweep jobs failed (job 1)")
    assert not (sweep / "1" / "result.json").exists()
