"""The trainer the CLI builds from the composed config: which checkpoint callbacks it ends up with."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from flux_lightning.run.train import build_trainer


def _cfg(tmp_path, **trainer):
    node = {
        "_target_": "lightning.Trainer",
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "default_root_dir": str(tmp_path),
        **trainer,
    }
    return OmegaConf.create({"trainer": node})


def test_no_model_checkpoint_means_no_checkpoints(tmp_path):
    """`callbacks.model_checkpoint=null`: Lightning must not add its default ModelCheckpoint, which saves
    every epoch (every few steps on a 1-20 image dataset) under the logger's folder."""
    trainer = build_trainer(_cfg(tmp_path), [], [])
    assert trainer.checkpoint_callbacks == []


def test_the_configured_model_checkpoint_is_the_only_one(tmp_path):
    ours = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=5)
    trainer = build_trainer(_cfg(tmp_path), [ours], [])
    assert trainer.checkpoint_callbacks == [ours]


def test_an_explicit_enable_checkpointing_is_left_to_lightning(tmp_path):
    trainer = build_trainer(_cfg(tmp_path, enable_checkpointing=True), [], [])
    assert len(trainer.checkpoint_callbacks) == 1
