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
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see (``X as X``: a re-export)
    from .adapters import AdapterConfig as AdapterConfig
    from .data import DatasetConfig as DatasetConfig
    from .data import FluxDataModule as FluxDataModule
    from .model.config import ModelConfig as ModelConfig
    from .model.quantization import QuantizationConfig as QuantizationConfig
    from .model.tread import TreadConfig as TreadConfig
    from .model.tread import TreadRoute as TreadRoute
    from .training.flow import LossConfig as LossConfig
    from .training.flow import TimestepConfig as TimestepConfig
    from .training.module import FluxLoRAModule as FluxLoRAModule
    from .training.optim import LRSchedulerConfig as LRSchedulerConfig
    from .training.optim import OptimizerConfig as OptimizerConfig
    from .training.rollout import ScheduledSamplingConfig as ScheduledSamplingConfig


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # imported once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
