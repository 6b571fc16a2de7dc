"""Datasets: config schema, discovery and captions, transforms, caches and the DataModule
(docs/architecture.md: "Pairs are a backend kind", "Data flow of one run")."""

from ..errors import DataError
from .config import DatasetConfig
from .datamodule import FluxDataModule

__all__ = ["DataError", "DatasetConfig", "FluxDataModule"]
