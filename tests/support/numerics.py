"""Comparing trained weights across kernels or code paths: the bound of tests/e2e/test_defaults_unchanged.py.

After a few AdamW steps an element whose gradient is near zero can take its step with the other sign when
another kernel (or a sharded reduction) sums in another order: a few elements differ by up to ~lr, while a
real change of the run moves most elements. Measured on the default run across AVX512/AVX2/DEFAULT kernels and
two CPU vendors: at most 1.7% of the elements beyond (atol 1e-6, rtol 1e-5), relative L2 distance at most
3.0e-4; a learning rate 1% higher: 53%, 1.5e-3.
"""

from __future__ import annotations

import torch

MAX_MOVED_FRACTION = 0.05  # elements beyond rounding: 1.7% measured across kernels, 53% for lr x 1.01
MAX_RELATIVE_L2 = 1e-3  # ||now - recorded|| / ||recorded||: 3.0e-4 across kernels, 1.5e-3 for lr x 1.01


def beyond_rounding(now: dict[str, torch.Tensor], recorded: dict[str, torch.Tensor]) -> str | None:
    """Why `now` is not the recorded run up to another kernel's rounding, or None."""
    if sorted(now) != sorted(recorded):
        return f"other tensors: {sorted(set(now) ^ set(recorded))[:3]}"
    moved = sum(int((now[k] - v).abs().gt(1e-6 + 1e-5 * v.abs()).sum()) for k, v in recorded.items())
    fraction = moved / sum(v.numel() for v in recorded.values())
    distance = sum(float((now[k].double() - v.double()).norm() ** 2) for k, v in recorded.items()) ** 0.5
    relative = distance / sum(float(v.double().norm() ** 2) for v in recorded.values()) ** 0.5
    if fraction > MAX_MOVED_FRACTION or relative > MAX_RELATIVE_L2:
        return f"{fraction:.1%} of the elements moved (bound {MAX_MOVED_FRACTION:.0%}), relative L2 {relative:.2e} (bound {MAX_RELATIVE_L2:.0e})"
    return None
