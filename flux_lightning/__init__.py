"""flux_lightning: train Flux.1 LoRA adapters with PyTorch Lightning and Hydra."""

from .adapters import AdapterConfig
from .components import ModelConfig
from .data import DatasetConfig, FluxDataModule
from .flow import TimestepConfig
from .module import FluxLoRAModule
from .optim import LRSchedulerConfig, OptimizerConfig
from .quantization import QuantizationConfig
from .tread import TreadConfig, TreadRoute

__all__ = [
    "AdapterConfig",
    "DatasetConfig",
    "FluxDataModule",
    "FluxLoRAModule",
    "LRSchedulerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "QuantizationConfig",
    "TimestepConfig",
    "TreadConfig",
    "TreadRoute",
]
