"""What the LoRA tools check before they compute or write anything, each a one-line :class:`LoraFileError`
(or :class:`StorageError`) naming the file and the key.

- Inputs (:func:`check_tensors`): every ``lora_A``/``lora_B``/``lora_down``/``lora_up`` weight is a
  non-empty 2-D floating tensor of finite values, a module's down ``(r, in)`` and up ``(out, r)``
  agree on ``r``, and an ``.alpha`` is one finite positive number; metadata alphas are checked where
  they are read (:func:`alpha_value`).
- Outputs (:func:`check_finite_output`): every tensor about to be written is finite (a large alpha
  folded into a float16 factor can overflow), so a tool never writes NaN/inf weights.
- ``--out`` (:func:`check_out`): an existing path is refused unless ``--overwrite``, and the input
  file itself (the same file by ``os.path.samefile``: symlinks and hard links too) never; files are
  written atomically (:func:`write_safetensors`), a storage error names ``--out``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ..atomic_files import save_safetensors_atomic
from ..errors import LoraFileError, StorageError

_FACTOR = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)\.weight$")
_DOWN_UP = {"lora_A": ("lora_B", 0), "lora_down": ("lora_up", 0)}


def _damaged(path, key: str, what: str) -> LoraFileError:
    return LoraFileError(f"{path}: {key} {what}; the file is damaged or not a LoRA: re-export or re-download it")


def _first_bad(value: torch.Tensor) -> str:
    flat = value.detach().reshape(-1)
    bad = flat[~torch.isfinite(flat.float())]
    return f"{bad[0].item()}" if bad.numel() else "?"


def check_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a LoRA file whose factors or alphas cannot describe an update (see the module doc)."""
    for key, value in tensors.items():
        if _FACTOR.search(key):
            if not value.is_floating_point():
                raise _damaged(path, key, f"holds {str(value.dtype).removeprefix('torch.')} values, not floats")
            if value.dim() != 2:
                raise _damaged(path, key, f"is {value.dim()}-D {tuple(value.shape)}, not a 2-D matrix")
            if value.numel() == 0:
                raise _damaged(path, key, f"is empty {tuple(value.shape)} (rank or width 0)")
            if not torch.isfinite(value).all():
                raise _damaged(path, key, f"holds non-finite values ({_first_bad(value)})")
        elif key.endswith(".alpha"):
            alpha_value(path, key, value)
    for key, down in tensors.items():
        found = _FACTOR.search(key)
        if not found or found.group(1) not in _DOWN_UP:
            continue
        up_key = key[: found.start()] + f".{_DOWN_UP[found.group(1)][0]}.weight"
        up = tensors.get(up_key)
        if up is not None and up.shape[1] != down.shape[0]:
            raise LoraFileError(
                f"{path}: {key} has rank {down.shape[0]} {tuple(down.shape)} but {up_key} has rank {up.shape[1]} "
                f"{tuple(up.shape)}; the down and up matrices of a module must agree: re-export the LoRA"
            )


def alpha_value(path, key: str, value) -> float:
    """A module's alpha as a float: one finite positive number (an ``.alpha`` tensor or a metadata value)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise _damaged(path, key, f"holds {value.numel()} values {tuple(value.shape)}, not one alpha")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _damaged(path, key, f"is {value!r}, not a number")
    if not math.isfinite(value) or value <= 0:
        raise _damaged(path, key, f"is {value}, not a finite positive alpha")
    return float(value)


def check_finite_output(out, tensors: dict[str, torch.Tensor], source) -> None:
    """Refuse to write non-finite weights (e.g. a huge alpha folded into a float16 factor)."""
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise LoraFileError(
                f"--out {out}: not written: {key} would hold non-finite values ({_first_bad(value)}) computed from "
                f"{source} (its alpha or weights overflow {str(value.dtype).removeprefix('torch.')}); check that file"
            )


def check_out(out, inputs, overwrite: bool) -> Path:
    """``--out`` may be written: not an input file (ever), not an existing path unless ``overwrite``."""
    out = Path(out)
    for source in inputs:
        try:
            same = os.path.samefile(out, source)
        except OSError:
            same = os.path.realpath(out) == os.path.realpath(source)
        if same:
            raise LoraFileError(
                f"--out {out} is the input file {source}; pass another --out (the input is never overwritten)"
            )
    if out.is_dir():
        raise LoraFileError(f"--out {out} is a folder; pass the path of a .safetensors file to write")
    if os.path.lexists(out) and not overwrite:
        raise LoraFileError(f"--out {out} already exists; pass a new --out or add --overwrite to replace it")
    return out


def storage_error(out, err: StorageError) -> StorageError:
    """The same error, worded for ``--out`` (the training options it would suggest do not apply here)."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    return StorageError(
        err.errno,
        f"--out {out}: cannot write it ({reason}); pass an --out in a writable folder with free space "
        "(nothing was written there)",
    )


def write_safetensors(tensors: dict[str, torch.Tensor], out, metadata: dict[str, str], source) -> Path:
    """Check every tensor is finite, then write ``out`` atomically; storage errors name ``--out``."""
    check_finite_output(out, tensors, source)
    try:
        return save_safetensors_atomic(tensors, Path(out), metadata)
    except StorageError as err:
        raise storage_error(out, err) from None
