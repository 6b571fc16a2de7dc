"""The steady-state training step with the default optimizer reads nothing back to the host, and
bf16-mixed (the GPU default) trains with the fused AdamW and gradient clipping."""

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.callbacks import LossProgressBar
from flux_lightning.training.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

# what reads a tensor's value on the host (on an accelerator: a sync that drains the kernel queue)
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


class CountHostReads(TorchDispatchMode):
    """``.item()``-like reads at the dispatcher (``_local_scalar_dense``) plus Python-level calls of
    :data:`HOST_READS` on tensors (``.cpu()`` and ``.numpy()`` of a CPU tensor dispatch nothing)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        self.calls: list[str] = []
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(self_, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return self.count + len(self.calls)


class WatchSteps(L.Callback):
    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.marks: list[tuple[int, list[str]]] = []

    def on_train_start(self, trainer, pl_module):
        self.mode = CountHostReads(self.monkeypatch)
        self.mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.append((self.mode.total, list(self.mode.calls)))

    def on_train_end(self, trainer, pl_module):
        self.marks.append((self.mode.total, list(self.mode.calls)))
        self.mode.__exit__(None, None, None)
        self.monkeypatch.undo()

    def per_step(self) -> list[int]:
        return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]


def _data(n: int = 20):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "latents": torch.randn(16, 8, 8, generator=g),
            "prompt_embeds": torch.randn(32, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(32, generator=g),
        }
        for _ in range(n)
    ]


def _fit(cfg, callbacks, precision="32-true", steps=8):
    L.seed_everything(0, verbose=False)
    module = FluxLoRAModule(cfg, AdapterConfig(rank=4), optimizer=partial(build_optimizer, name="adamw", lr=1e-3))
    module.nonfinite.host_decides = False  # the accelerator's path: select on the device, read nothing
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        log_every_n_steps=4,
        callbacks=[*callbacks, LossProgressBar(refresh_rate=4)],
    )
    trainer.fit(module, torch.utils.data.DataLoader(_data(), batch_size=2))
    return module, trainer


def test_default_optimizer_steps_read_nothing_back_outside_logging_steps(tiny_model_cfg, monkeypatch):
    """The GPU default (bf16-mixed, torch's fused AdamW, clipping at 1.0). The fused AdamW keeps its
    step counter on the device: no read; the first step creates the optimizer state (read once, one
    step later, by the guard)."""
    watch = WatchSteps(monkeypatch)
    module, trainer = _fit(tiny_model_cfg, [watch], "bf16-mixed")
    assert module.trainer.optimizers[0].defaults["fused"]
    steps = watch.per_step()
    assert len(steps) == 8
    quiet = [n for i, n in enumerate(steps) if (i + 1) % 4 and i > 1]  # neither logs nor redraws, state exists
    assert quiet == [0] * len(quiet), (steps, watch.marks)


def test_bf16_mixed_clips_gradients_with_the_fused_optimizer(tiny_model_cfg):
    """Lightning refuses clipping for an optimizer that unscales itself under any mixed precision;
    bf16 has no scaler, so the module clips as in full precision (every default GPU run needs it)."""
    module = FluxLoRAModule(tiny_model_cfg)
    module.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.full((3,), 10.0)
    module.configure_gradient_clipping(torch.optim.AdamW([param], fused=True), 1.0, "norm")
    assert torch.allclose(param.grad.norm(), torch.tensor(1.0), atol=1e-5)
