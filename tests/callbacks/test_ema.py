"""Adapter EMA (``callbacks.ema``): the average against a hand computation, exact resume, the second
export file, and validation images rendered with the EMA while the live weights come back bit for bit."""

from __future__ import annotations

import signal
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.adapters import ADAPTER_FILENAME
from flux_lightning.callbacks import AdapterEMA, AdapterExport, ValidationImages
from flux_lightning.callbacks.ema import EMA_FILENAME
from flux_lightning.errors import ConfigError, StopRequested
from flux_lightning.training import stopping
from flux_lightning.training.stopping import GracefulStop

from ..conftest import make_datamodule
from .test_validation import _fake_trainer, _random_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, DECAY, EVERY, START = 6, 0.9, 2, 3  # updates after steps 4 and 6
ADAPTER = AdapterConfig(rank=4, dropout=0.1)  # dropout draws from the RNG: a resume must restore it


class Recorder(L.Callback):
    """The trainable tensors after every optimizer step."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _run(model_cfg, cache_root, out, callbacks, *, ckpt_path=None, adapter=ADAPTER):
    L.seed_everything(0, verbose=False)
    module = FluxLoRAModule(model_cfg, adapter, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    checkpoints = ModelCheckpoint(
        dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="s{step}", auto_insert_metric_name=False
    )
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, checkpoints],
    )
    trainer.fit(module, make_datamodule(model_cfg, cache_root), ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def straight(tiny_model_cfg, cache_root, tmp_path_factory):
    """An uninterrupted 6-step run with the EMA (exported) and a checkpoint at step 3."""
    out = tmp_path_factory.mktemp("ema")
    recorder, ema = Recorder(), AdapterEMA(decay=DECAY, update_every=EVERY, start_step=START)
    export = AdapterExport(str(out / "lora"), dtype="fp32")
    module = _run(tiny_model_cfg, cache_root, out, [recorder, ema, export])
    return out, module, recorder, ema


def test_the_ema_is_the_hand_computed_average_of_the_steps_it_samples(straight):
    _, module, recorder, ema = straight
    p = recorder.after
    expected = {k: DECAY * p[4][k] + (1 - DECAY) * p[6][k] for k in p[6]}  # step 4 initialises, 6 averages
    assert ema.updates == 2 and set(ema.ema) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(ema.ema[k], v, rtol=1e-6, atol=1e-7)
        assert ema.ema[k].device.type == "cpu" and ema.ema[k].dtype == torch.float32
    assert not torch.equal(p[4][k], p[6][k])  # the steps moved the weights, so the average means something
    # the live weights are the last step's, untouched by the EMA
    assert all(torch.equal(module.state_dict()[k], p[6][k]) for k in p[6])


def test_a_resumed_run_has_exactly_the_uninterrupted_runs_ema(straight, tiny_model_cfg, cache_root, tmp_path):
    out, _, _, ema = straight
    saved = torch.load(out / "ckpt" / "s3.ckpt", map_location="cpu", weights_only=False)
    assert "AdapterEMA" not in saved["callbacks"]  # no update before step 4: nothing to save yet
    resumed = AdapterEMA(decay=DECAY, update_every=EVERY, start_step=START)
    _run(tiny_model_cfg, cache_root, tmp_path, [resumed], ckpt_path=out / "ckpt" / "s3.ckpt")
    assert resumed.updates == ema.updates
    assert all(torch.equal(resumed.ema[k], ema.ema[k]) for k in ema.ema)
    # and from a checkpoint that holds an EMA (step 6): restored bit for bit
    restored = AdapterEMA(decay=DECAY)
    restored.load_state_dict(torch.load(out / "ckpt" / "s6.ckpt", weights_only=False)["callbacks"]["AdapterEMA"])
    assert restored.updates == 2 and all(torch.equal(restored.ema[k], ema.ema[k]) for k in ema.ema)


class _SignalAt(L.Callback):
    """A SIGTERM's flag (as ``stopping``'s handler sets it) during step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            stopping._state["signum"] = signal.SIGTERM


@pytest.mark.parametrize("stop_at", [4, 5])  # at an update's step, and between two
def test_a_graceful_stop_and_resume_has_exactly_the_uninterrupted_runs_ema(
    straight, tiny_model_cfg, cache_root, tmp_path, stop_at
):
    """The stop's last.ckpt is written in GracefulStop.on_exception, before the EMA callback's
    on_train_batch_end would have run for that step: the checkpoint must hold that step's update."""
    _, _, _, ema = straight
    stop = GracefulStop()
    try:
        with pytest.raises(StopRequested):
            _run(
                tiny_model_cfg,
                cache_root,
                tmp_path / "stopped",
                [stop, _SignalAt(stop_at), AdapterEMA(decay=DECAY, update_every=EVERY, start_step=START)],
            )
    finally:
        stopping.uninstall()
    assert stop.checkpoint is not None and stop.step == stop_at
    resumed = AdapterEMA(decay=DECAY, update_every=EVERY, start_step=START)
    _run(tiny_model_cfg, cache_root, tmp_path / "resumed", [resumed], ckpt_path=stop.checkpoint)
    assert resumed.updates == ema.updates
    assert all(torch.equal(resumed.ema[k], ema.ema[k]) for k in ema.ema)


def test_the_ema_file_is_written_beside_the_main_file_and_loads(straight, tiny_model_cfg):
    out, module, _, ema = straight
    main, averaged = out / "lora" / ADAPTER_FILENAME, out / "lora" / EMA_FILENAME
    a, b = load_file(main), load_file(averaged)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # loaded as a LoRA (our init_lora path: diffusers' reader), the file is the EMA exactly
    loaded = FluxLoRAModule(tiny_model_cfg, replace(ADAPTER, init_lora=str(averaged)))
    loaded.configure_model()
    assert all(torch.equal(loaded.state_dict()[k], ema.ema[k]) for k in ema.ema)


def test_validation_renders_with_the_ema_and_restores_the_live_weights_bit_for_bit(tiny_model_cfg, tmp_path):
    module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=4, init="gaussian"))
    module.configure_model()
    ema = AdapterEMA(decay=0.5, use_for_validation=True)
    ema.update(module)  # the EMA starts at these weights ...
    with torch.no_grad():  # ... then the weights move on (as training does)
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    live = {k: v.clone() for k, v in module.state_dict().items()}

    def render(name, callbacks):
        cb = ValidationImages(
            str(tmp_path / name),
            validation_prompt="a red circle",
            validation_resolution=32,
            validation_num_inference_steps=2,
        )
        records = cb.generate(_fake_trainer(_random_embeddings(cb.prompt_texts()), callbacks=callbacks), module)
        return np.asarray(records[0].image)

    with_ema = render("ema", [ema])
    assert all(torch.equal(module.state_dict()[k], v) for k, v in live.items())
    plain = render("plain", [])
    with ema.applied(module):
        by_hand = render("by_hand", [])
    assert np.array_equal(with_ema, by_hand) and not np.array_equal(with_ema, plain)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in live.items())


def test_one_update_per_optimizer_step_under_accumulation_and_none_repeated_after_a_resume():
    weight = torch.nn.Parameter(torch.zeros(2))
    module = SimpleNamespace(named_parameters=lambda: [("w", weight)], device=torch.device("cpu"))
    ema = AdapterEMA(decay=0.5)
    trainer = SimpleNamespace(global_step=3)  # resumed from a checkpoint at step 3
    ema.on_train_start(trainer, module)
    for step, value in [(3, 9.0), (4, 1.0), (4, 7.0), (5, 3.0), (5, 7.0)]:  # two micro-batches a step
        trainer.global_step = step
        with torch.no_grad():
            weight.fill_(value)
        ema.on_train_batch_end(trainer, module, None, None, 0)
    assert ema.updates == 2 and torch.equal(ema.ema["w"], torch.full((2,), 2.0))  # 0.5 * 1 + 0.5 * 3


def test_off_by_default_and_bad_settings_name_the_field():
    off = AdapterEMA()
    assert not off.enabled and off.state_dict() == {} and off.summary_rows() == []
    with pytest.raises(ConfigError) as err:
        AdapterEMA(decay=1.0, update_every=0, start_step=-1, device="gpu")
    for field in (
        "callbacks.ema.decay",
        "callbacks.ema.update_every",
        "callbacks.ema.start_step",
        "callbacks.ema.device",
    ):
        assert field in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device", ["cpu", "accelerator"])
def test_the_ema_lives_where_it_is_told(tiny_model_cfg, device):
    module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=4, weight_dtype="bf16"))
    module.configure_model()
    module.to("cuda")
    ema = AdapterEMA(decay=0.9, device=device)
    ema.update(module)
    ema.update(module)
    kind = "cpu" if device == "cpu" else "cuda"
    assert all(t.device.type == kind and t.dtype == torch.float32 for t in ema.ema.values())
    assert all(p.device.type == "cuda" for p in module.parameters() if p.requires_grad)
