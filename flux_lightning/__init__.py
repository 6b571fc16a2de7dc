"""flux_lightning: train Flux.1 LoRA and LoKr adapters with PyTorch Lightning and Hydra.

The map of the package (layers, the data flow of a run, where each concept lives, how to add a
flavour, an optimizer, a backend kind or a callback) is ``docs/architecture.md``.
"""

from .adapters import AdapterConfig
from .data import DatasetConfig, FluxDataModule
from .model.config import ModelConfig
from .model.quantization import QuantizationConfig
from .model.tread import TreadConfig, TreadRoute
from .training.flow import LossConfig, TimestepConfig
from .training.module import FluxLoRAModule
from .training.optim import LRSchedulerConfig, OptimizerConfig
from .training.rollout import ScheduledSamplingConfig

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
