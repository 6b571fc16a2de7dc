"""flux_lightning: train Flux.1 LoRA and LoKr adapters with PyTorch Lightning and Hydra.

The map of the package (layers, the data flow of a run, where each concept lives, how to add a
flavour, an optimizer, a backend kind or a callback) is ``docs/architecture.md``.
"""

from .adapters import AdapterConfig
from .model_config import ModelConfig
from .data import DatasetConfig, FluxDataModule
from .flow import LossConfig, TimestepConfig
from .module import FluxLoRAModule
from .optim import LRSchedulerConfig, OptimizerConfig
from .quantization import QuantizationConfig
from .rollout import ScheduledSamplingConfig
from .tread import TreadConfig, TreadRoute

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
