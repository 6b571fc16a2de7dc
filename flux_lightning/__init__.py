"""flux_lightning: train Flux.1 LoRA and LoKr adapters with PyTorch Lightning and Hydra.

The map of the package (layers, the data flow of a run, where each concept lives, how to add a
flavour, an optimizer, a backend kind or a callback) is ``docs/architecture.md``.

The names below are imported when first used (PEP 562), not by ``import flux_lightning``: the
command line (``python -m flux_lightning``, ``flux-lightning``) then decides how its heavy imports
run (``run/heap.py``), and ``flux-lightning ui|configure|lora`` import only what they use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "AdapterConfig": ".adapters",
    "DatasetConfig": ".data",
    "FluxDataModule": ".data",
    "FluxLoRAModule": ".training.module",
    "LRSchedulerConfig": ".training.optim",
    "LossConfig": ".training.flow",
    "ModelConfig": ".model.config",
    "OptimizerConfig": ".training.optim",
    "QuantizationConfig": ".model.quantization",
    "ScheduledSamplingConfig": ".training.rollout",
    "TimestepConfig": ".training.flow",
    "TreadConfig": ".model.tread",
    "TreadRoute": ".model.tread",
}
__all__ = [
    "AdapterConfig",
    "DatasetConfig",
    "FluxDataModule",
    "FluxLoRAModule",
    "LRSchedulerConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "QuantizationConfig",
    "ScheduledSamplingConfig",
    "TimestepConfig",
    "TreadConfig",
    "TreadRoute",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .adapters import AdapterConfig
    from .data import DatasetConfig, FluxDataModule
    from .model.config import ModelConfig
    from .model.quantization import QuantizationConfig
    from .model.tread import TreadConfig, TreadRoute
    from .training.flow import LossConfig, TimestepConfig
    from .training.module import FluxLoRAModule
    from .training.optim import LRSchedulerConfig, OptimizerConfig
    from .training.rollout import ScheduledSamplingConfig


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # imported once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
