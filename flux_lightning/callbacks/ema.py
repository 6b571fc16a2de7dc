"""An exponential moving average (EMA) of the trainable adapter tensors only -- never of the base.

Off by default (``callbacks.ema.decay: null``). With ``callbacks.ema.decay=d``, after every optimizer
step ``n`` (``trainer.global_step`` once the step is done: 1 for the first) with
``n >= start_step`` and ``n % update_every == 0``::

    ema = param                              the first such step (initialised from the weights)
    ema = d * ema + (1 - d) * param          every later one

There is no decay warm-up: the first update copies the weights, so the average never starts from zero
(no bias correction is needed). The EMA is held in fp32 (also for a bf16 adapter) on the CPU or on the
training device (``device``), is saved in every checkpoint (Lightning's callback state) and restored on
resume, so a resumed run's EMA equals the uninterrupted run's.

Two hooks (``hooks.ValidationWeights``, ``hooks.ExtraExports``; docs/architecture.md) let other callbacks use it:
``validation_weights(pl_module)`` (``ValidationImages`` renders with the EMA swapped in when
``use_for_validation``) and ``extra_exports(pl_module)`` (``AdapterExport`` writes
``pytorch_lora_weights_ema.safetensors`` beside the main file when ``export``). Swapping in copies the
EMA into the live parameters; swapping back copies the saved live tensors, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import lightning as L
import torch

from ..errors import Problem
from ..training.hooks import (
    ConfigChecked,
    ExtraExports,
    FinishStep,
    SummaryRows,
    TrainableParameters,
    ValidationWeights,
    raise_problems,
)

EMA_FILENAME = "pytorch_lora_weights_ema.safetensors"
EMA_DEVICES = ("cpu", "accelerator")
_FIELD = "callbacks.ema"


class AdapterEMA(L.Callback):
    """EMA of the adapter's trainable tensors (see the module doc for the update rule).

    Args:
        decay: the EMA decay ``d`` in ``[0, 1)``; null = off (the callback does nothing, adds nothing
            to checkpoints). Typical: 0.999 for thousands of steps, 0.99 for hundreds.
        update_every: update after every n-th optimizer step.
        start_step: first optimizer step (``global_step`` after it) that updates; the EMA starts as a
            copy of the weights there.
        device: ``cpu`` (no accelerator memory; one device-to-host copy of the adapter per update) or
            ``accelerator`` (beside the weights, the training device).
        use_for_validation: ``ValidationImages`` renders with the EMA weights (once the EMA exists;
            the baseline at step 0 and rounds before ``start_step`` use the live weights).
        export: ``AdapterExport`` also writes ``pytorch_lora_weights_ema.safetensors`` (same format and
            dtype as the main file) once the EMA exists.
    """

    implements = (
        ConfigChecked,
        FinishStep,
        ValidationWeights,
        ExtraExports,
        SummaryRows,
    )  # hooks.py; tests/callbacks/test_hooks.py checks them

    def __init__(
        self,
        decay: float | None = None,
        update_every: int = 1,
        start_step: int = 0,
        device: str = "cpu",
        use_for_validation: bool = False,
        export: bool = True,
    ):
        raise_problems(
            self.config_problems(
                {"decay": decay, "update_every": update_every, "start_step": start_step, "device": device}, field=_FIELD
            )
        )
        self.decay = None if decay is None else float(decay)
        self.update_every, self.start_step = update_every, start_step
        self.device = device
        self.use_for_validation, self.export = use_for_validation, export
        self.ema: dict[str, torch.Tensor] = {}  # parameter name -> fp32 average
        self.updates = 0  # how many updates made it
        self._seen_step = -1  # the global_step of the last update (micro-batches of one step share it)

    @classmethod
    def config_problems(cls, args: Mapping, *, field: str = _FIELD, run=None) -> list[Problem]:
        """A decay outside [0, 1), an interval or start that is no whole number, an unknown device."""
        out = []
        decay, update_every = args.get("decay"), args.get("update_every", 1)
        start_step, device = args.get("start_step", 0), args.get("device", "cpu")
        if decay is not None and (isinstance(decay, bool) or not 0.0 <= float(decay) < 1.0):
            out.append(
                Problem(
                    f"{field}.decay", f"{field}.decay={decay!r} must be within [0, 1) (e.g. 0.999), or null for no EMA"
                )
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            out.append(
                Problem(f"{field}.update_every", f"{field}.update_every={update_every!r} must be an integer >= 1")
            )
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            out.append(Problem(f"{field}.start_step", f"{field}.start_step={start_step!r} must be an integer >= 0"))
        if device not in EMA_DEVICES:
            out.append(Problem(f"{field}.device", f"{field}.device={device!r} is unknown; use cpu or accelerator"))
        return out

    @property
    def enabled(self) -> bool:
        return self.decay is not None

    # -- the average ---------------------------------------------------------------------------
    @staticmethod
    def _params(pl_module) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters by name: ``FluxLoRAModule.trainable_named_parameters`` (cached),
        else a walk of any LightningModule's parameters."""
        if isinstance(pl_module, TrainableParameters):
            return pl_module.trainable_named_parameters()
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def _target_device(self, pl_module) -> torch.device:
        return torch.device("cpu") if self.device == "cpu" else pl_module.device

    @torch.no_grad()
    def update(self, pl_module) -> None:
        """One EMA update from ``pl_module``'s trainable parameters (see the module doc)."""
        params = self._params(pl_module)
        device = self._target_device(pl_module)
        if set(params) != set(self.ema):
            if self.ema:  # a resumed EMA of another adapter: never average unrelated tensors
                raise RuntimeError(
                    f"{_FIELD}: the saved EMA holds other tensors than this adapter's trainable parameters "
                    "(was the checkpoint trained with another adapter.rank/target?)"
                )
            self.ema = {n: p.detach().to(device, torch.float32, copy=True) for n, p in params.items()}
        else:
            names = list(params)
            ema = [self.ema[n] for n in names]
            if ema[0].device != device:  # restored from a checkpoint onto the CPU
                ema = [t.to(device) for t in ema]
                self.ema = dict(zip(names, ema))
            live = [params[n].detach().to(device, torch.float32) for n in names]
            torch._foreach_mul_(ema, self.decay)
            torch._foreach_add_(ema, live, alpha=1.0 - self.decay)
        self.updates += 1

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run starts at the checkpoint's step, whose update (if any) the checkpoint holds
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.finish_step(trainer, pl_module)

    def finish_step(self, trainer, pl_module) -> None:
        """The update for the optimizer step just taken, once per step (``GracefulStop`` calls it
        before a stop's ``last.ckpt``, which is written before this callback's batch end)."""
        step = trainer.global_step
        if not self.enabled or step == self._seen_step:
            return
        self._seen_step = step  # with gradient accumulation several batches end at one step
        if step >= self.start_step and step % self.update_every == 0:
            self.update(pl_module)

    # -- swapping the EMA in -------------------------------------------------------------------
    @contextmanager
    def applied(self, pl_module) -> Iterator[None]:
        """Inside the block the trainable parameters hold the EMA (cast to their dtype); on exit they
        hold exactly what they held before."""
        if not self.ema:
            raise RuntimeError(f"{_FIELD}: no EMA yet (the first update is at step {max(self.start_step, 1)})")
        params = self._params(pl_module)
        saved = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.ema[n].to(p.device, p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    def validation_weights(self, pl_module):
        """The weights validation renders with: the EMA's (a context manager) or None (the live ones)."""
        return self.applied(pl_module) if self.enabled and self.use_for_validation and self.ema else None

    def extra_exports(self, pl_module) -> list[tuple[str, object]]:
        """``(file name, context manager)`` pairs the adapter export writes besides the main file."""
        return [(EMA_FILENAME, self.applied(pl_module))] if self.enabled and self.export and self.ema else []

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.enabled or not self.ema:
            return {}
        return {"ema": {n: t.detach().cpu() for n, t in self.ema.items()}, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self.ema = {n: t.float() for n, t in state_dict["ema"].items()}
        self.updates = int(state_dict["updates"])

    def summary_rows(self) -> list[tuple[str, object]]:
        if not self.enabled:
            return []
        return [("adapter EMA", f"decay {self.decay}, {self.updates} updates")]
