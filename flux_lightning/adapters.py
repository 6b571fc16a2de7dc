"""LoRA on the Flux transformer: target presets, PEFT set-up, and export in diffusers keys.

The exported file is what ``FluxPipeline.load_lora_weights`` reads: tensors
``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` and, in the safetensors metadata,
diffusers' ``lora_adapter_metadata`` (the PEFT config, so alpha != rank keeps its effect) plus
plain ``lora_rank`` / ``lora_alpha`` entries for other tools.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LORA_FILENAME = "pytorch_lora_weights.safetensors"

_MMDIT = ["to_q", "to_k", "to_v", "to_out.0"]
_CONTEXT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_FFS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]

TARGET_PRESETS: dict[str, list[str]] = {
    "mmdit": _MMDIT,
    "all": _MMDIT + _CONTEXT,
    "context": _CONTEXT,
    "context+ffs": _CONTEXT + ["ff_context.net.0.proj", "ff_context.net.2"],
    "all+ffs": _MMDIT + _CONTEXT + _FFS,
    "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
    "nano": ["single_transformer_blocks.7.proj_out"],
}

INIT_TYPES = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


@dataclass
class AdapterConfig:
    """LoRA hyper-parameters (``adapter=lora``).

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. Null = rank (scale 1).
        dropout: dropout on the LoRA branch input during training.
        target: a preset name from :data:`TARGET_PRESETS` or an explicit list of module names
            (matched by suffix, as PEFT does).
        init: ``default`` (A Kaiming, B zero), ``gaussian``, ``pissa`` or ``olora``. PiSSA/OLoRA move
            the principal part of W into the adapter; export converts back to a plain LoRA (rank 2r).
    """

    type: str = "lora"
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.1
    target: Any = "all"
    init: str = "default"

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def resolve_targets(target: Any) -> list[str]:
    """Module-name suffixes for ``adapter.target`` (a preset name or a list of names)."""
    if isinstance(target, str):
        if target not in TARGET_PRESETS:
            raise ValueError(
                f"adapter.target={target!r} is not a preset; use one of {sorted(TARGET_PRESETS)} "
                "or a list of module names"
            )
        return list(TARGET_PRESETS[target])
    names = [str(t) for t in target]
    if not names:
        raise ValueError("adapter.target is an empty list; name at least one module")
    return names


def add_lora(transformer: torch.nn.Module, cfg: AdapterConfig) -> None:
    """Inject a trainable LoRA (fp32) into the frozen ``transformer`` in place."""
    from peft import LoraConfig, inject_adapter_in_model

    if cfg.type != "lora":
        raise ValueError(f"adapter.type={cfg.type!r} is not supported yet; use lora")
    if cfg.init not in INIT_TYPES:
        raise ValueError(f"adapter.init={cfg.init!r} is unknown; use one of {sorted(INIT_TYPES)}")
    if cfg.rank < 1:
        raise ValueError(f"adapter.rank must be >= 1, got {cfg.rank}")
    targets = resolve_targets(cfg.target)
    present = {name for name, _ in transformer.named_modules()}
    if not any(n == t or n.endswith("." + t) for n in present for t in targets):
        raise ValueError(
            f"adapter.target={cfg.target!r} matches no module of this transformer "
            f"(looked for {targets}); pick another preset or list existing module names"
        )
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights=INIT_TYPES[cfg.init],
    )
    inject_adapter_in_model(config, transformer, adapter_name="default")
    transformer._flux_lightning_lora_config = config
    initial = {}
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
            if cfg.init in ("pissa", "olora"):
                initial[name] = param.detach().clone()
        else:
            param.requires_grad_(False)
    # PiSSA/OLoRA subtract B0 A0 from the base weight; export needs A0, B0 to undo that.
    transformer._flux_lightning_initial_lora = initial


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as its frozen base: every PEFT adapter layer bypassed, flags restored after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed like diffusers' files, without the ``transformer.`` prefix."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(transformer).items()}


def export_lora(
    transformer: torch.nn.Module,
    cfg: AdapterConfig,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    lora_format: str = "diffusers",
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``<directory>/pytorch_lora_weights.safetensors`` atomically and return its path.

    ``lora_format`` picks the key layout (see :mod:`flux_lightning.lora_formats`). For PiSSA/OLoRA
    the trained ``(A, B)`` and initial ``(A0, B0)`` become one rank-2r LoRA ``A' = [A; A0]``,
    ``B' = [B, -B0]`` with alpha doubled, so that on the *original* base ``W0 + s (B A - B0 A0)``
    equals the training model's weight.
    """
    from safetensors.torch import save_file

    from .lora_formats import convert

    state = lora_state_dict(transformer)
    rank, alpha = cfg.rank, cfg.lora_alpha
    initial = getattr(transformer, "_flux_lightning_initial_lora", {})
    if initial:
        state = _convert_principal_init(state, initial)
        rank, alpha = 2 * rank, 2 * alpha
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
        "lora_target": json.dumps(sorted(config["target_modules"])),
        **(extra_metadata or {}),
    }
    if lora_format == "kohya":
        metadata.update(ss_network_module="networks.lora_flux", ss_network_dim=str(rank), ss_network_alpha=str(alpha))
    elif lora_format == "diffusers":  # comfyui carries alpha as tensors; diffusers refuses both at once
        metadata["lora_adapter_metadata"] = json.dumps(
            {f"transformer.{k}": v for k, v in config.items()}, sort_keys=True, default=str
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lora.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, directory / LORA_FILENAME)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return directory / LORA_FILENAME


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
