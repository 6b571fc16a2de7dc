"""Loggers: CSV and W&B (offline) receive the training scalars and the validation grid."""

import csv

import pytest
from hydra import compose, initialize_config_dir

from flux_lightning.run.train import config_dir, train


def _cfg(tmp_path, *extra):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp_path}/run",
                f"paths.cache_dir={tmp_path}/cache",
                "trainer.max_steps=4",
                "trainer.log_every_n_steps=1",
                "adapter.rank=2",
                *extra,
            ],
        )


def test_csv_logger_records_the_train_loss(tmp_path):
    train(_cfg(tmp_path, "logger=csv", "callbacks.validation=null"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert sum(1 for r in rows if r.get("loss/train")) == 4


def test_wandb_logger_works_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "run"))
    train(_cfg(tmp_path, "logger=wandb", "callbacks.validation.before_training=false"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    media = list(runs[0].rglob("validation/images*"))
    assert media, "the validation grid was not logged"


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """The W&B run id comes from the run dir and ``resume: allow``: training the same dir again (a
    resume) logs to the same W&B run; another dir gets another id."""
    wandb = pytest.importorskip("wandb")
    from flux_lightning.run.rundir import wandb_run_id

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "run"))
    wandb.finish()  # a run another test of this worker left open would be reused by the first train()
    run_id = wandb_run_id(str(tmp_path / "run"))
    assert run_id.startswith("run-") and run_id != wandb_run_id(str(tmp_path / "other" / "run"))
    for steps in (2, 4):
        cfg = _cfg(tmp_path, "logger=wandb", "callbacks.validation=null", f"trainer.max_steps={steps}")
        assert (cfg.logger.wandb.id, cfg.logger.wandb.resume) == (run_id, "allow")
        train(cfg)
        wandb.finish()  # as when the process ends (Lightning reuses a run still open in this process)
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
