"""Run evaluation work without touching the training trajectory: RNG streams and train/eval modes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Save every RNG stream training draws from (torch CPU and all CUDA devices, Python ``random``,
    NumPy) and put it back on exit, whatever happened inside."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


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
