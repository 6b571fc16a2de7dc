"""``merge``: a diffusers folder with a LoRA fused into its transformer.

The LoRA (any layout :mod:`.files` reads) is loaded into the base transformer with diffusers' own
``load_lora_adapter``, fused with ``fuse_lora(lora_scale=...)`` and unloaded (``unload_lora``), and the
plain transformer is saved with ``save_pretrained`` in the base's dtype. The other components (VAE,
text encoders, tokenizers, scheduler, ``model_index.json``) are hard-linked from the base where the
file system allows, else copied. The folder is built beside ``out`` and renamed into place, so a
half-written folder is never seen; ``FluxPipeline.from_pretrained(out)`` loads it.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from ..adapters.lora_checks import check_finite_output, storage_error
from ..adapters.lora_files import LoraFile, check_flux_modules, read_lora
from ..adapters.lora_layouts import tensors_for
from ..atomic_files import build_folder_once
from ..errors import LoraFileError, ModelSourceError, StorageError

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def base_problems(base: Path) -> str | None:
    if not (base / "model_index.json").is_file() or not (base / "transformer" / "config.json").is_file():
        return (
            f"{base}: not a local diffusers folder (needs model_index.json and transformer/config.json); pass "
            "a folder saved by save_pretrained, e.g. a downloaded snapshot of black-forest-labs/FLUX.1-dev"
        )
    return None


def saved_dtype(folder: Path) -> torch.dtype | None:
    """The dtype the transformer's weights are stored in (first tensor of its first safetensors file)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                return _DTYPES.get(f.get_slice(key).get_dtype())
    return None


def layer_problems(lora: LoraFile, transformer: torch.nn.Module, base: Path) -> str | None:
    """One line if a LoRA module is no Linear layer of ``transformer`` or has other widths."""
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [m for m in lora.modules if m not in linears]
    if missing:
        n, total = len(missing), len(lora.modules)
        what = "match no layer" if n == total else f"{n} of {total} modules match no layer"
        return (
            f"{lora.path}: its keys {what} of the base {base} (e.g. {missing[0]!r}); merge it into the model "
            "it was trained for"
        )
    for name, mod in lora.modules.items():
        layer = linears[name]
        if (mod.up.shape[0], mod.down.shape[1]) != (layer.out_features, layer.in_features):
            return (
                f"{lora.path}: module {name!r} is {mod.down.shape[1]} -> {mod.up.shape[0]} wide but the base {base} "
                f"has {layer.in_features} -> {layer.out_features}; merge it into the model it was trained for"
            )
    return None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge(base, lora, out, scale: float = 1.0) -> Path:
    """Write ``out``: the diffusers folder ``base`` with the LoRA file ``lora`` fused at ``scale``."""
    from diffusers import FluxTransformer2DModel

    base, out = Path(base), Path(out)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraFileError(f"--scale {scale}: not a finite number; pass the LoRA's strength, e.g. --scale 1.0")
    problem = base_problems(base)
    if problem:
        raise ModelSourceError(problem)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraFileError(f"{out}: already exists; pass a new --out folder or delete this one")
    adapter = read_lora(lora)
    check_flux_modules(adapter)
    transformer = FluxTransformer2DModel.from_pretrained(
        base, subfolder="transformer", torch_dtype=saved_dtype(base / "transformer")
    )
    problem = layer_problems(adapter, transformer, base)
    if problem:
        raise LoraFileError(problem)
    state = tensors_for(adapter.modules, "diffusers", adapter.path)
    transformer.load_lora_adapter(state, prefix="transformer", adapter_name="merged")
    transformer.fuse_lora(lora_scale=scale, adapter_names=["merged"])
    transformer.unload_lora()
    fused = {f"{m}.weight": transformer.get_submodule(m).weight.detach() for m in adapter.modules}
    check_finite_output(out, fused, adapter.path)

    def build(tmp: Path) -> None:
        for entry in base.iterdir():
            if entry.name == "transformer" or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(tmp / entry.name))
        transformer.save_pretrained(tmp / "transformer")

    try:
        if out.is_dir():  # an empty folder: build_folder_once renames onto a new name only
            out.rmdir()
        return build_folder_once(out, build)
    except StorageError as err:
        raise storage_error(out, err) from None
    except OSError as err:
        raise storage_error(out, StorageError(err.errno, str(err))) from None
