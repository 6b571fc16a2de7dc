"""Start-up phase timestamps, for ``benchmarks/startup.py`` (where do the seconds before step 1 go?).

Off unless the environment variable ``FLUX_LIGHTNING_TIMINGS`` names a file: then every phase
appends one JSON line ``{"phase": name, "start": t0, "end": t1}`` (wall-clock ``time.time()``
seconds, so another process can subtract the moment it launched the command). Phases: ``imported``
(``python -m flux_lightning`` has imported the library), ``composed`` (Hydra handed over the
config), ``validated``, ``instantiated`` (callbacks, datamodule, module, trainer), then the Lightning
hooks that run before step 1: the datamodule's ``prepare_data`` and ``setup``, each callback's
``setup`` / ``on_fit_start`` / ``on_train_start`` / ``on_validation_images`` (the before-training
validation images, CLIP score and eval loss baselines), the module's ``configure_model``, the first
batch and the first optimizer step. When off, :func:`mark` reads one environment variable and
:func:`instrument` returns ``[]``: nothing is wrapped.
"""

from __future__ import annotations

import functools
import json
import os
import time

import lightning as L

ENV = "FLUX_LIGHTNING_TIMINGS"
_CALLBACK_HOOKS = ("setup", "on_fit_start", "on_train_start", "on_validation_images")


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def record(phase: str, start: float, end: float | None = None) -> None:
    """Append ``phase`` (from ``start`` to ``end``; a point when ``end`` is None) to the timings file."""
    path = os.environ.get(ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"phase": phase, "start": start, "end": start if end is None else end}) + "\n")


def mark(phase: str) -> None:
    """A point in time: ``phase`` has just finished."""
    if enabled():
        record(phase, time.time())


def _timed(obj, name: str, phase: str) -> None:
    method = getattr(obj, name)

    @functools.wraps(method)  # Lightning's is_overridden() follows __wrapped__
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return method(*args, **kwargs)
        finally:
            record(phase, start, time.time())

    setattr(obj, name, wrapper)


class _FirstSteps(L.Callback):
    """Marks the first batch's arrival and the end of the first optimizer step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            mark("first batch loaded")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= 1 and not getattr(self, "_done", False):
            self._done = True
            mark("first optimizer step")


def instrument(datamodule, module, callbacks: list) -> list:
    """When enabled, time the hooks that run before step 1 (see the module docstring) and return a
    callback marking the first step; when off, return ``[]`` and change nothing."""
    if not enabled():
        return []
    for name in ("prepare_data", "setup"):
        _timed(datamodule, name, f"datamodule.{name}")
    _timed(module, "configure_model", "module.configure_model")
    for cb in callbacks:
        for hook in _CALLBACK_HOOKS:
            own = getattr(type(cb), hook, None)
            if own is not None and own is not getattr(L.Callback, hook, None):
                _timed(cb, hook, f"{type(cb).__name__}.{hook}")
    return [_FirstSteps()]
