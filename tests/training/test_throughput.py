"""Throughput hygiene: no host-device sync inside a training step, workers and pinned memory by default."""

import os
from functools import partial

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.callbacks import LossProgressBar
from flux_lightning.data.datamodule import default_num_workers
from flux_lightning.model.tread import TreadConfig, TreadRoute

from ..conftest import make_datamodule


class CountScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``, ...):
    on an accelerator each is a sync that stalls the queue of kernels."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class WatchSteps(L.Callback):
    """Host reads between consecutive batch starts: forward, backward, clipping, optimizer step,
    Lightning's per-step logging and the progress bar (data comes from memory here)."""

    def __init__(self):
        self.mode = CountScalarReads()
        self.marks = []

    def on_train_start(self, trainer, pl_module):
        self.mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.append(self.mode.count)

    def on_train_end(self, trainer, pl_module):
        self.marks.append(self.mode.count)
        self.mode.__exit__(None, None, None)

    @property
    def per_step(self) -> list[int]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def test_training_steps_read_values_back_only_when_logging(tiny_model_cfg):
    """SGD here: torch's and torch-optimi's Adam read their step counter, a CPU tensor even on GPU runs."""
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "latents": torch.randn(16, 8, 8, generator=g),
            "prompt_embeds": torch.randn(32, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(32, generator=g),
        }
        for _ in range(20)  # 10 steps per epoch: no epoch end inside the 8 steps
    ]
    watch = WatchSteps()
    L.seed_everything(0)
    module = FluxLoRAModule(
        tiny_model_cfg,
        AdapterConfig(rank=4),
        optimizer=partial(torch.optim.SGD, lr=1e-3),
        tread=TreadConfig([TreadRoute(0.5, 1, -2)]),
    )
    # the accelerator's way of applying the non-finite guard (selected on the device, no read); on
    # the CPU the guard reads its flag every step, which waits for nothing there
    module.nonfinite.host_decides = False
    trainer = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        log_every_n_steps=4,
        callbacks=[watch, LossProgressBar(refresh_rate=4)],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    steps = watch.per_step
    assert len(steps) == 8
    quiet = [n for i, n in enumerate(steps) if (i + 1) % 4]  # steps that neither log nor redraw
    assert quiet == [0] * 6, steps
    assert "loss/train" in trainer.callback_metrics


def test_dataloader_workers_and_pinned_memory_follow_the_hardware(tiny_model_cfg, cache_root, monkeypatch):
    dm = make_datamodule(tiny_model_cfg, cache_root)
    dm.prepare_data()
    dm.setup()
    assert dm.cfg.num_workers is None  # automatic by default
    loader = dm.train_dataloader()
    assert loader.num_workers == 0 and not loader.pin_memory  # CPU-only: the step needs the cores

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert default_num_workers() == 4  # up to 4 per GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert default_num_workers() == 1  # 16 cores shared by 8 GPU processes, one left for the step
    loader = dm.train_dataloader()
    assert loader.pin_memory and loader.num_workers == 1 and loader.persistent_workers
