"""Random-number streams: snapshot and restore, in a checkpoint or around work that must not disturb them.

Training draws from Python's ``random``, NumPy's global generator and torch's CPU and CUDA generators.
:func:`rng_states` / :func:`set_rng_states` carry all four through a checkpoint (bit-exact resume);
:func:`preserved_rng` runs evaluation work (validation images, CLIP, eval loss) without moving them;
:func:`seeded` builds something from a fixed seed (the tiny models) without moving torch's CPU stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def rng_states() -> dict:
    """Python, NumPy, torch CPU and CUDA RNG states, as types ``torch.load(weights_only=True)`` reads."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Put back what :func:`rng_states` returned (CUDA states only where CUDA is available)."""
    random.setstate(states["python"])
    name, key, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Save every RNG stream training draws from (torch CPU and all CUDA devices, Python ``random``,
    NumPy) and put it back on exit, whatever happened inside. CUDA is not initialised for it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)`` inside; torch's CPU generator is back to its previous state on exit."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(state)
