"""Run evaluation work without touching the training trajectory: RNG streams (:mod:`flux_lightning.training.rng`)
and train/eval modes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..training.rng import preserved_rng


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module.eval()`` inside (LoRA dropout off); every submodule's own ``training`` flag restored."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextmanager
def isolated(module: torch.nn.Module) -> Iterator[None]:
    """:func:`preserved_rng` and :func:`eval_mode` together, under ``torch.no_grad``."""
    with preserved_rng(), eval_mode(module), torch.no_grad():
        yield
