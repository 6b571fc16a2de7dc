"""Datasets: config schema, discovery and captions, transforms, caches and the DataModule."""

from .config import DatasetConfig
from .datamodule import FluxDataModule
from ..errors import DataError

__all__ = ["DataError", "DatasetConfig", "FluxDataModule"]
