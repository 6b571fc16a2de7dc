"""Adapters on the frozen Flux transformer: PEFT LoRA or LyCORIS LoKr, chosen by ``adapter.type``.

Modules, each importing only those before it (no cycles):

* :mod:`.config` -- :class:`AdapterConfig`, target presets, :meth:`AdapterConfig.problems`.
* :mod:`.lora` -- PEFT LoRA: set-up, ``init_lora`` files, the frozen assistant LoRA.
* :mod:`.lokr` -- LyCORIS LoKr: set-up, its file layout, conversion for diffusers.
* :mod:`.lora_layouts` -- every LoRA file layout (diffusers / ComfyUI / kohya), read and written.
* :mod:`.lora_files` -- LoRA files for the tools: read (also a checkpoint's LoRA) and written.
* :mod:`.export` -- write the trained adapter, whatever its type.

This module dispatches on ``cfg.type`` for the code that should not care which adapter it has.
"""

from __future__ import annotations

import torch

from .config import (
    ADAPTER_FILENAME,
    ADAPTER_TYPES,
    BASE_MODIFYING_INITS,
    INIT_TYPES,
    LYCORIS_PRESETS,
    TARGET_PRESETS,
    AdapterConfig,
    resolve_targets,
)
from .export import export_adapter, export_lora, lora_format_problems
from .lokr import add_lokr, export_lokr, load_lokr_weights, lokr_network, lokr_state_dict, to_diffusers_state_dict
from .lora import (
    ASSISTANT,
    TRAINED,
    adapters_disabled,
    add_assistant_lora,
    add_lora,
    assistant_disabled,
    has_assistant,
    load_init_lora,
    lora_state_dict,
    read_lora_file,
    set_active_adapters,
)
from .lora_layouts import LORA_FORMATS


def add_adapter(transformer: torch.nn.Module, cfg: AdapterConfig, dtype: torch.dtype = torch.float32) -> None:
    """Add the trainable adapter of ``cfg`` to the frozen ``transformer`` (weights in ``dtype``);
    continue from ``cfg.init_lora`` when set."""
    if cfg.type == "lokr":
        add_lokr(transformer, cfg)
        if cfg.init_lora:
            load_lokr_weights(transformer, cfg.init_lora)
    else:
        add_lora(transformer, cfg)
        if cfg.init_lora:
            load_init_lora(transformer, cfg, cfg.init_lora)
    cast_adapter(transformer, dtype)


def adapter_state_dict(transformer: torch.nn.Module, cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """The trained adapter's tensors in its own layout: diffusers-style LoRA keys without the
    ``transformer.`` prefix, or LyCORIS LoKr keys (``lycoris_<path>.lokr_w1``, ...)."""
    return lokr_state_dict(transformer) if cfg.type == "lokr" else lora_state_dict(transformer)


def trainable_adapter_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train: the adapter's (the base and any assistant LoRA are frozen)."""
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def cast_adapter(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold the trainable adapter weights in ``dtype`` (the frozen base is untouched)."""
    for param in trainable_adapter_parameters(transformer).values():
        param.data = param.data.to(dtype)


__all__ = [
    "ADAPTER_FILENAME",
    "ADAPTER_TYPES",
    "ASSISTANT",
    "BASE_MODIFYING_INITS",
    "INIT_TYPES",
    "LORA_FORMATS",
    "LYCORIS_PRESETS",
    "TARGET_PRESETS",
    "TRAINED",
    "AdapterConfig",
    "adapter_state_dict",
    "adapters_disabled",
    "add_adapter",
    "add_assistant_lora",
    "add_lokr",
    "add_lora",
    "assistant_disabled",
    "cast_adapter",
    "export_adapter",
    "export_lokr",
    "export_lora",
    "has_assistant",
    "load_init_lora",
    "load_lokr_weights",
    "lokr_network",
    "lokr_state_dict",
    "lora_format_problems",
    "lora_state_dict",
    "read_lora_file",
    "resolve_targets",
    "set_active_adapters",
    "to_diffusers_state_dict",
    "trainable_adapter_parameters",
]
