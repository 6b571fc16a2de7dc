"""Exporting never costs a run: a format that cannot name the targets is refused before training, and
a failure while writing leaves training and the final checkpoint intact (then the run exits non-zero)."""

import logging
from functools import partial

import huggingface_hub
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open

import flux_lightning.adapters.export
from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.adapters import ADAPTER_FILENAME
from flux_lightning.callbacks import AdapterExport, ModelCard
from flux_lightning.config.validation import ConfigError, validate
from flux_lightning.errors import AdapterExportError

from ..config.test_config import _compose
from ..conftest import make_datamodule

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


@pytest.mark.parametrize(
    "target,named",
    [("[context_embedder]", "context_embedder"), ("[to_q,x_embedder,norm_out.linear]", "norm_out.linear, x_embedder")],
)
def test_config_validation_refuses_kohya_for_modules_it_cannot_name(tmp_path, target, named):
    cfg = _compose(tmp_path, "callbacks.adapter_export.lora_format=kohya", f"adapter.target={target}")
    with pytest.raises(
        ConfigError, match=r"callbacks.adapter_export.lora_format=kohya has no key for module\(s\) "
    ) as err:
        validate(cfg, check_sources=False)
    assert f"module(s) {named} selected by adapter.target" in str(err.value)
    assert "lora_format=diffusers or comfyui" in str(err.value)
    for fmt in ("diffusers", "comfyui"):
        validate(
            _compose(tmp_path, f"callbacks.adapter_export.lora_format={fmt}", f"adapter.target={target}"),
            check_sources=False,
        )
    validate(
        _compose(tmp_path, "callbacks.adapter_export.lora_format=kohya", "adapter.target=all+ffs"), check_sources=False
    )


def _trainer(tmp_path, export: AdapterExport, max_steps: int = STEPS, extra=()) -> L.Trainer:
    """A short run with the checkpoint settings of conf/callbacks/default.yaml."""
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=500,
        save_top_k=5,
        monitor="step",
        mode="max",
        save_last=True,
    )
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[export, *extra, checkpoint],
    )


def _module(tiny_model_cfg, target="mmdit"):
    return FluxLoRAModule(
        tiny_model_cfg, AdapterConfig(rank=2, dropout=0.0, target=target), optimizer=partial(torch.optim.AdamW, lr=1e-3)
    )


def test_library_run_refuses_the_format_before_weights_load(tiny_model_cfg, cache_root, tmp_path):
    module = _module(tiny_model_cfg, target=["to_q", "context_embedder"])
    trainer = _trainer(tmp_path, AdapterExport(str(tmp_path / "lora"), lora_format="kohya"))
    with pytest.raises(ConfigError, match=r"lora_format=kohya has no key for module\(s\) context_embedder"):
        trainer.fit(module, make_datamodule(tiny_model_cfg, cache_root))
    assert module.transformer is None and trainer.global_step == 0


def test_failed_export_keeps_the_final_checkpoint_and_fails_the_run_after_it(
    tiny_model_cfg, cache_root, tmp_path, monkeypatch, caplog
):
    def disk_full(tensors, path, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flux_lightning.adapters.export, "save_safetensors_atomic", disk_full)
    L.seed_everything(0)
    dm = make_datamodule(tiny_model_cfg, cache_root)
    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    export = AdapterExport(str(tmp_path / "lora"))
    card = ModelCard(str(tmp_path / "lora"), push_to_hub=True, hub_model_id="me/x")
    with caplog.at_level(logging.ERROR), pytest.raises(AdapterExportError, match="No space left on device") as err:
        _trainer(tmp_path, export, extra=[card]).fit(_module(tiny_model_cfg), dm)
    assert not uploads and "push_to_hub to me/x skipped: the adapter export failed" in caplog.text
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == STEPS, "the final checkpoint was lost"
    assert "re-run the same command" in str(err.value)
    target = str(tmp_path / "lora" / ADAPTER_FILENAME)
    assert f"writing {target} failed at step {STEPS} (OSError" in caplog.text

    # the cause fixed, re-running resumes at the final step and only exports
    monkeypatch.undo()
    export = AdapterExport(str(tmp_path / "lora"))
    trainer = _trainer(tmp_path, export)
    trainer.fit(_module(tiny_model_cfg), make_datamodule(tiny_model_cfg, cache_root), ckpt_path=str(last))
    assert trainer.global_step == STEPS and export.path == tmp_path / "lora" / ADAPTER_FILENAME
    with safe_open(export.path, "pt") as f:
        assert f.metadata()["flux_lightning.step"] == str(STEPS)


def test_a_failure_at_a_checkpoint_is_forgotten_once_a_later_export_succeeds(
    tiny_model_cfg, cache_root, tmp_path, monkeypatch
):
    calls = []
    real = flux_lightning.adapters.export.save_safetensors_atomic

    def fail_first(tensors, path, metadata=None):
        calls.append(metadata["flux_lightning.step"])
        if calls[-1] == "1":
            raise PermissionError("read-only for a moment")
        return real(tensors, path, metadata)

    monkeypatch.setattr(flux_lightning.adapters.export, "save_safetensors_atomic", fail_first)
    export = AdapterExport(str(tmp_path / "lora"))
    trainer = _trainer(tmp_path, export, max_steps=2)
    trainer.callbacks[-1]._every_n_train_steps = 1  # a checkpoint (and export) at every step
    trainer.fit(_module(tiny_model_cfg), make_datamodule(tiny_model_cfg, cache_root))
    assert "1" in calls and calls.count("2") == 1  # step 2 written once (checkpoint, last.ckpt, train end)
    assert export.error is None  # no AdapterExportError: the final file is good
    with safe_open(export.path, "pt") as f:
        assert f.metadata()["flux_lightning.step"] == "2"


def test_every_checkpoint_keeps_its_own_loadable_lora_pruned_like_the_checkpoints(tiny_model_cfg, cache_root, tmp_path):
    from safetensors.torch import load_file

    class Snap(L.Callback):  # the main file's content right after each checkpoint's export
        def __init__(self):
            self.at = {}

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self.at[trainer.global_step] = load_file(tmp_path / "lora" / ADAPTER_FILENAME)

    export, snap = AdapterExport(str(tmp_path / "lora"), dtype="fp32"), Snap()
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=2,
        save_top_k=2,
        monitor="step",
        mode="max",
    )
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[export, snap, checkpoint],
    )
    trainer.fit(_module(tiny_model_cfg), make_datamodule(tiny_model_cfg, cache_root))
    kept = sorted(p.name for p in (tmp_path / "lora").glob("step_*"))
    assert kept == ["step_000004", "step_000006"]  # step 2 pruned, as its checkpoint was
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["step000004.ckpt", "step000006.ckpt"]
    for step in (4, 6):
        own = load_file(tmp_path / "lora" / f"step_{step:06d}" / ADAPTER_FILENAME)
        assert own.keys() == snap.at[step].keys() and all(torch.equal(own[k], snap.at[step][k]) for k in own)
    latest, four = load_file(tmp_path / "lora" / ADAPTER_FILENAME), snap.at[4]
    assert any(not torch.equal(latest[k], four[k]) for k in latest)  # the top file is the latest
