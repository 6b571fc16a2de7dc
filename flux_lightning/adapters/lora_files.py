"""LoRA files for the tools: read any supported file (or a training run's checkpoint) as one map
``diffusers module -> LoraModule(down, up, alpha)``, and write one, atomically, in a layout. The
layouts themselves (keys, the diffusers <-> kohya/BFL table, fusing and splitting, alpha conventions)
are :mod:`.lora_layouts`; this module does the file I/O: safetensors tensors and metadata, Lightning
checkpoints, the checks of :mod:`.lora_checks`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraFileError
from .lora_checks import alpha_value, check_tensors, write_safetensors
from .lora_layouts import LoraModule, file_layout, read_modules, read_peft, tensors_for, unknown_modules


@dataclass
class LoraFile:
    """A LoRA file read as diffusers modules; ``layout`` is the one it was written in."""

    path: Path
    layout: str  # diffusers | comfyui | kohya
    modules: dict[str, LoraModule]
    metadata: dict[str, str]


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a ``.safetensors`` file; :class:`LoraFileError` naming it otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such LoRA file; pass the path of a .safetensors file")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFileError(
            f"{path}: not a readable .safetensors file ({err}); pass a LoRA .safetensors file"
        ) from None


def read_lora(path) -> LoraFile:
    """Read any supported LoRA file as diffusers modules (see the module doc); a Lightning ``.ckpt``
    of a training run gives its adapter's LoRA (:func:`read_checkpoint`)."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return read_checkpoint(path)
    tensors, metadata = load_tensors(path)
    layout = file_layout(path, tensors)
    check_tensors(path, tensors)
    return LoraFile(path, layout, read_modules(path, tensors, metadata, layout), metadata)


_CKPT_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.default\.weight")


def read_checkpoint(path) -> LoraFile:
    """The trained LoRA of a training run's Lightning checkpoint: its ``state_dict`` holds the adapter's
    tensors only (``transformer.<module>.lora_A.default.weight``), ``hyper_parameters["adapter"]`` its
    rank and alpha. Read with ``torch.load(weights_only=True)`` (no code in the file runs). A LoKr, DoRA
    or PiSSA/OLoRA/LoftQ-initialised adapter (whose LoRA is relative to a changed base) is refused."""
    from .config import BASE_MODIFYING_INITS

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such checkpoint; pass the path of a .ckpt file of a training run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 -- truncated zip, bad pickle, not a torch file, a class not allowed
        reason = " ".join(str(err).split())[:160] or "unreadable"
        raise LoraFileError(
            f"{path}: not a readable Lightning checkpoint ({type(err).__name__}: {reason}); pass a .ckpt written by "
            "a training run (checkpoints/last.ckpt) or a LoRA .safetensors file"
        ) from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    adapter = hparams.get("adapter") if isinstance(hparams, dict) else None
    if not isinstance(state, dict) or not isinstance(adapter, dict):
        raise LoraFileError(
            f"{path}: not a checkpoint of this trainer (no state_dict or hyper_parameters.adapter); pass a .ckpt "
            "written by python -m flux_lightning or a LoRA .safetensors file"
        )
    kind = adapter.get("type", "lora")
    if kind != "lora":
        raise LoraFileError(
            f"{path}: a checkpoint of adapter.type={kind}; these tools handle LoRA only (use its exported file)"
        )
    if adapter.get("use_dora"):
        raise LoraFileError(f"{path}: a DoRA checkpoint; these tools handle plain LoRA only (use its exported file)")
    if adapter.get("init") in BASE_MODIFYING_INITS:
        raise LoraFileError(
            f"{path}: a checkpoint of adapter.init={adapter['init']}, whose LoRA is relative to a changed base; "
            "use the LoRA file the run exported (lora/pytorch_lora_weights.safetensors)"
        )
    tensors = {}
    for key, value in state.items():
        found = _CKPT_KEY.fullmatch(str(key).replace("._orig_mod", ""))
        if found and isinstance(value, torch.Tensor):
            tensors[f"transformer.{found.group(1)}.lora_{found.group(2)}.weight"] = value
    if not tensors:
        raise LoraFileError(
            f"{path}: the checkpoint holds no LoRA tensors (transformer.<module>.lora_A.default.weight)"
        )
    rank = adapter.get("rank")
    alpha = adapter.get("alpha")
    alpha = alpha_value(path, "hyper_parameters.adapter.alpha", rank if alpha is None else alpha)
    metadata = {"lora_adapter_metadata": json.dumps({"lora_alpha": alpha}, default=str)}
    check_tensors(path, tensors)
    return LoraFile(path, "checkpoint", read_peft(path, tensors, metadata), metadata)


def check_flux_modules(lora: LoraFile) -> None:
    bad = unknown_modules(lora.modules)
    if bad:
        what = (
            "no layer" if len(bad) == len(lora.modules) else f"{len(bad)} of {len(lora.modules)} modules match no layer"
        )
        raise LoraFileError(
            f"{lora.path}: {what} of a Flux transformer (e.g. {bad[0]!r}); pass a Flux.1 LoRA "
            "(LoRAs of other models cannot be converted or merged here)"
        )


def write_lora(
    modules: dict[str, LoraModule], layout: str, out, metadata: dict[str, str] | None = None, source="the LoRA"
) -> Path:
    """Write ``modules`` to the file ``out`` in ``layout`` (atomically, every tensor checked finite), with
    the layout's metadata; ``source`` names the input in errors."""
    out = Path(out)
    tensors = {k: v.contiguous() for k, v in tensors_for(modules, layout, source).items()}
    ranks = {mod.rank for mod in modules.values()}
    meta = {"format": "pt", "lora_format": layout, **(metadata or {})}
    if len(ranks) == 1 and layout == "diffusers":  # alpha folded: alpha = r
        rank = str(ranks.pop())
        meta.update(lora_rank=rank, lora_alpha=rank)
    if layout == "kohya":
        meta["ss_network_module"] = "networks.lora_flux"
    return write_safetensors(tensors, out, meta, source)
