"""A process that writes cache entries, then sits in one long C call (as a VAE encode of large images
does on a loaded CPU), with the run's stop handling installed: ``python tests/support/stop_during_long_op.py DIR``.
Prints ``busy`` when the long call starts. Used by tests/e2e/test_signals.py."""

import sys
from pathlib import Path

import torch

from flux_lightning.data.cache import TensorCache
from flux_lightning.training import stopping

stopping.install()
cache = TensorCache(Path(sys.argv[1]))
for i in range(3):
    cache.save(f"{i:064x}", {"latents": torch.zeros(16, 8, 8)}, {})
torch.set_num_threads(1)
a = torch.randn(2000, 2000, dtype=torch.float64)
print("busy", flush=True)
torch.linalg.matrix_power(a, 2**62 - 1)  # one C call of ~124 matmuls: minutes, and no Python bytecode runs meanwhile
print("the long call ended before the stop", flush=True)
