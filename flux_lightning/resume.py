"""Reading the Lightning checkpoint a run resumes from, without loading it."""

from __future__ import annotations

from pathlib import Path

import torch


def checkpoint_step(path) -> int:
    """The ``global_step`` of a Lightning checkpoint, reading only its pickle (tensors are mapped,
    not read): a cheap check that the file is a complete checkpoint before Lightning loads it.

    Raises:
        ValueError: the file is empty, truncated, corrupt or not a Lightning checkpoint (the reason).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, bad pickle, not a torch file
        raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'unreadable'}") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt or "state_dict" not in ckpt:
        raise ValueError("not a Lightning checkpoint (no global_step/state_dict)")
    return int(ckpt["global_step"])
