"""Write the trained adapter to disk: LoRA (diffusers / ComfyUI / kohya layouts) or LoKr (LyCORIS).

The LoRA file is what ``FluxPipeline.load_lora_weights`` reads: ``transformer.<module>.lora_A.weight`` /
``.lora_B.weight`` plus, in the safetensors metadata, diffusers' ``lora_adapter_metadata`` (the PEFT
config) and plain ``lora_rank`` / ``lora_alpha`` entries.

One file, one meaning in every consumer: the update a LoRA makes is ``(alpha / r) B A``. diffusers
reads alpha from the metadata (or from ``.alpha`` tensors), ComfyUI and kohya-style loaders only from
``.alpha`` tensors (without one they apply ``B A``, scale 1). So the ``diffusers`` layout, which has no
``.alpha`` tensors, stores ``B' = (alpha / r) B`` and records ``alpha = r``: every loader, whatever it
reads, applies ``B' A = (alpha / r) B A``. The ``comfyui`` and ``kohya`` layouts keep the trained
alpha as tensors. ``lora_trained_alpha`` in the metadata records the alpha the run used.

DoRA (``adapter.use_dora``): the weight is ``m * (W + s B A) / ||W + s B A||`` (row norms), so folding
``s = alpha / r`` into ``B`` leaves it unchanged; the magnitudes are written as
``transformer.<module>.lora_magnitude_vector`` (PEFT's key, which diffusers' loader recognises as DoRA),
the ``diffusers`` layout only.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..atomic_files import save_safetensors_atomic
from ..errors import Problem
from .config import ADAPTER_FILENAME, AdapterConfig, resolve_targets
from .lokr import export_lokr
from .lora import lora_state_dict
from .lora_layouts import LORA_FORMATS, convert, unsupported_modules


def export_adapter(transformer: torch.nn.Module, cfg: AdapterConfig, directory, **kwargs) -> Path:
    """Write the trained adapter to ``directory`` in the format of its type (see :func:`export_lora`
    and :func:`.lokr.export_lokr`)."""
    if cfg.type == "lokr":
        fmt = kwargs.pop("lora_format", "diffusers")
        if fmt != "diffusers":
            warnings.warn(
                f"lora_format={fmt} applies to LoRA; adapter=lokr is always written in the LyCORIS "
                "layout, which ComfyUI and kohya-style loaders read",
                stacklevel=2,
            )
        return export_lokr(transformer, cfg, directory, **kwargs)
    return export_lora(transformer, cfg, directory, **kwargs)


def export_lora(
    transformer: torch.nn.Module,
    cfg: AdapterConfig,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    lora_format: str = "diffusers",
    extra_metadata: dict[str, str] | None = None,
    filename: str = ADAPTER_FILENAME,
) -> Path:
    """Write ``<directory>/<filename>`` (default ``pytorch_lora_weights.safetensors``) atomically and
    return its path.

    ``lora_format`` picks the key layout (see :mod:`.lora_layouts`); the ``diffusers``
    layout folds ``alpha / r`` into ``lora_B`` and records ``alpha = r`` (see the module doc). For PiSSA/OLoRA
    the trained ``(A, B)`` and initial ``(A0, B0)`` become one rank-2r LoRA ``A' = [A; A0]``,
    ``B' = [B, -B0]`` with alpha doubled, so that on the *original* base ``W0 + s (B A - B0 A0)``
    equals the training model's weight.
    """
    state = lora_state_dict(transformer)
    if lora_format != "diffusers" and any(".lora_magnitude_vector" in k for k in state):
        raise ValueError(
            lora_format_problems(lora_format, cfg)[0]
            if cfg.use_dora
            else f"lora_format={lora_format} cannot carry DoRA magnitudes"
        )
    rank, alpha = cfg.rank, cfg.lora_alpha
    initial = getattr(transformer, "_flux_lightning_initial_lora", {})
    if initial:
        state = _convert_principal_init(state, initial)
        rank, alpha = 2 * rank, 2 * alpha
    trained_alpha = alpha
    if lora_format == "diffusers":  # no .alpha tensors: fold alpha / r into B (in fp32, before the cast)
        state = {k: (v.float() * (alpha / rank) if ".lora_B." in k else v) for k, v in state.items()}
        alpha = float(rank)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    out_features = {n: m.out_features for n, m in transformer.named_modules() if hasattr(m, "out_features")}
    tensors = convert(state, lora_format, alpha=alpha, out_features=out_features)
    config = transformer._flux_lightning_lora_config.to_dict()
    # Dropout is a training-time regulariser. diffusers' load_lora_weights leaves the injected LoRA
    # layers in train mode, so a file carrying lora_dropout > 0 would drop activations at inference.
    config.update(r=rank, lora_alpha=alpha, init_lora_weights=True, lora_dropout=0.0)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    metadata = {
        "format": "pt",
        "lora_format": lora_format,
        "lora_rank": str(rank),
        "lora_alpha": str(alpha),
        "lora_trained_alpha": str(trained_alpha),
        "lora_target": json.dumps(sorted(config["target_modules"])),
        **(extra_metadata or {}),
    }
    if lora_format == "kohya":
        metadata.update(ss_network_module="networks.lora_flux", ss_network_dim=str(rank), ss_network_alpha=str(alpha))
    elif lora_format == "diffusers":  # comfyui carries alpha as tensors; diffusers refuses both at once
        metadata["lora_adapter_metadata"] = json.dumps(
            {f"transformer.{k}": v for k, v in config.items()}, sort_keys=True, default=str
        )
    return save_safetensors_atomic(tensors, Path(directory) / filename, metadata)


def lora_format_problems(
    lora_format: str, adapter: AdapterConfig, field: str = "callbacks.adapter_export.lora_format"
) -> list[Problem]:
    """One line (with the fix) if the LoRA of ``adapter`` cannot be written as ``lora_format``;
    checked before training so that the export at the end cannot fail on it."""
    if adapter.type != "lora" or lora_format not in LORA_FORMATS:  # LoKr ignores lora_format
        return []
    if adapter.use_dora is True and lora_format != "diffusers":
        return [
            Problem(
                "adapter.use_dora",
                "adapter.use_dora=true is written in diffusers' layout only (lora_magnitude_vector tensors, which "
                f"diffusers loads as DoRA); {field}={lora_format} has no DoRA keys its "
                f"loaders apply the same way: use {field}=diffusers or adapter.use_dora=false",
            )
        ]
    try:
        targets = resolve_targets(adapter.target)
    except ValueError:  # reported by AdapterConfig.problems
        return []
    bad = unsupported_modules(lora_format, targets)
    if not bad:
        return []
    shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
    return [
        Problem(
            field,
            f"{field}={lora_format} has no key for module(s) {shown} selected by "
            f"adapter.target={adapter.target!r}; use {field}=diffusers or comfyui, "
            "or leave these modules out of adapter.target",
        )
    ]


def _convert_principal_init(
    state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        # state keys drop the adapter name: "x.lora_A.weight"; initial keys keep it: "x.lora_A.default.weight"
        init = initial[key.replace(".weight", ".default.weight")]
        if ".lora_A." in key:
            out[key] = torch.cat([value, init.to(value.dtype)], dim=0)
        else:
            out[key] = torch.cat([value, -init.to(value.dtype)], dim=1)
    return out
