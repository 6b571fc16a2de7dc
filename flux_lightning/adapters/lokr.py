"""LyCORIS LoKr on the Flux transformer (``adapter=lokr``), via the lycoris-lora package.

A LoKr update of a Linear ``W`` (``out x in``) is a Kronecker product
``dW = s * kron(W1, W2)`` with ``W1`` ``(out/f' x in/f'')`` small and ``W2`` the rest, where the
factorisation of each side is chosen by ``factor`` f. With ``full_matrix`` both factors are full
matrices and ``s = 1``; otherwise ``W2 = W2a @ W2b`` has rank ``r`` and ``s = alpha / r``.

Files. :func:`export_lokr` writes the LyCORIS layout (keys ``lycoris_<module path with _>.lokr_w1``,
``.lokr_w2`` or ``.lokr_w2_a/_b``, ``.alpha``), which ComfyUI loads for Flux (its "simpletrainer
lycoris" key map) and :func:`lycoris.create_lycoris_from_weights` loads back. Diffusers reads LoKr
for Flux only through ``FluxTransformer2DModel.load_lora_adapter`` with PEFT keys; use
:func:`to_diffusers_state_dict` for that (it needs one factor for all modules: ``ff_factor: null``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic_files import save_safetensors_atomic
from .config import ADAPTER_FILENAME, AdapterConfig, resolve_targets

NETWORK_ATTR = "lycoris"  # the LyCORIS network is registered on the transformer under this name

# Class names LyCORIS matches for the quickstart's "Attention + FeedForward" preset (diffusers named
# Flux's attention class `Attention` before 0.35 and `FluxAttention` since).
ATTENTION_CLASSES = ("FluxAttention", "Attention")
FEED_FORWARD_CLASSES = ("FeedForward",)


def _preset(cfg: AdapterConfig) -> dict:
    """A complete LyCORIS preset for ``cfg`` (complete, because LyCORIS keeps presets in class state)."""
    preset = dict(
        enable_conv=False,
        target_module=[],
        target_name=[],
        module_algo_map={},
        name_algo_map={},
        exclude_name=[],
        use_fnmatch=False,
        lora_prefix="lycoris",
    )
    if cfg.target == "attention+ff":
        ff_factor = cfg.factor if cfg.ff_factor is None else cfg.ff_factor
        preset["target_module"] = [*ATTENTION_CLASSES, *FEED_FORWARD_CLASSES]
        preset["module_algo_map"] = {
            **{c: {"factor": cfg.factor} for c in ATTENTION_CLASSES},
            **{c: {"factor": ff_factor} for c in FEED_FORWARD_CLASSES},
        }
    else:  # a LoRA-style preset or list: module-name suffixes
        suffixes = resolve_targets(cfg.target)
        preset["target_name"] = [rf"(.*\.)?{s.replace('.', '[.]')}$" for s in suffixes]
    return preset


def add_lokr(transformer: torch.nn.Module, cfg: AdapterConfig) -> torch.nn.Module:
    """Wrap the targeted Linears of the frozen ``transformer`` with trainable LoKr modules.

    The LyCORIS network becomes the submodule ``transformer.lycoris`` (so it moves, saves and
    renders with the transformer). Quantized Linears (quanto/bitsandbytes) run in LyCORIS' bypass
    mode, ``y = W_q x + dW x``. Returns the network.
    """
    from lycoris import LycorisNetwork

    LycorisNetwork.apply_preset(_preset(cfg))
    network = LycorisNetwork(
        transformer,
        multiplier=1.0,
        lora_dim=cfg.rank,
        alpha=cfg.lora_alpha,
        network_module="lokr",
        factor=cfg.factor,
        full_matrix=cfg.full_matrix,
        decompose_both=False,
        warn_on_unmatched=False,
    )
    if not network.loras:
        raise ValueError(
            f"adapter.target={cfg.target!r} matches no module of this transformer; "
            "use attention+ff or a LoRA preset such as all"
        )
    network.apply_to()
    transformer.requires_grad_(False)
    transformer.add_module(NETWORK_ATTR, network)
    network.requires_grad_(True)
    transformer._flux_lightning_lokr_config = cfg
    return network


def lokr_network(transformer: torch.nn.Module):
    network = getattr(transformer, NETWORK_ATTR, None)
    if network is None:
        raise ValueError("this transformer has no LoKr adapter (adapter.type is not lokr)")
    return network


def lokr_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LyCORIS-layout tensors of the trained LoKr (``lycoris_<path>.lokr_w1``, ``.alpha``, ...)."""
    return {k: v.detach() for k, v in lokr_network(transformer).state_dict().items()}


def export_lokr(
    transformer: torch.nn.Module,
    cfg: AdapterConfig,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    extra_metadata: dict[str, str] | None = None,
    filename: str = ADAPTER_FILENAME,
) -> Path:
    """Write ``<directory>/<filename>`` (default ``pytorch_lora_weights.safetensors``) in the LyCORIS
    layout, atomically.

    The metadata says ``flux_lightning.adapter=lokr`` and carries the LoKr settings, so a reader
    knows the file is not a PEFT LoRA.
    """
    tensors = {k: v.to(dtype).contiguous() for k, v in lokr_state_dict(transformer).items()}
    metadata = {
        "format": "pt",
        "flux_lightning.adapter": "lokr",
        "lycoris_algo": "lokr",
        "lycoris_config": json.dumps(asdict(cfg), sort_keys=True, default=str),
        **(extra_metadata or {}),
    }
    return save_safetensors_atomic(tensors, Path(directory) / filename, metadata)


def load_lokr_weights(transformer: torch.nn.Module, source: str | os.PathLike) -> None:
    """Copy a LyCORIS-layout LoKr file (e.g. one :func:`export_lokr` wrote) into this LoKr.

    Every LoKr module must be present in the file with the same shapes; anything else is a clear
    error naming what differs.
    """
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / ADAPTER_FILENAME
    state = load_file(str(path))
    network = lokr_network(transformer)
    ours = network.state_dict()
    if set(state) != set(ours):
        only_file, only_ours = sorted(set(state) - set(ours)), sorted(set(ours) - set(state))
        raise ValueError(
            f"adapter.init_lora: {source} does not match this LoKr (only in the file: {only_file[:3]}; "
            f"only in the config: {only_ours[:3]}); set adapter.target/factor/full_matrix/rank as it was trained"
        )
    wrong = [k for k in ours if tuple(ours[k].shape) != tuple(state[k].shape)]
    if wrong:
        raise ValueError(
            f"adapter.init_lora: {source} has other LoKr shapes (e.g. {wrong[0]}: file "
            f"{tuple(state[wrong[0]].shape)} vs config {tuple(ours[wrong[0]].shape)}); "
            "set adapter.factor/full_matrix/rank as it was trained"
        )
    with torch.no_grad():
        network.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()}, strict=True)


def to_diffusers_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoKr as PEFT keys for ``FluxTransformer2DModel.load_lora_adapter(sd, prefix="transformer")``.

    Keys ``transformer.<module>.lokr_w1`` etc.; the scale ``s`` is baked into ``W1`` because
    diffusers loads LoKr with scale 1. Diffusers infers one Kronecker factor for all modules, so
    this needs a uniform factor (``ff_factor: null`` or equal to ``factor``).
    """
    network = lokr_network(transformer)
    names = {id(m): n for n, m in transformer.named_modules()}
    out = {}
    for lokr in network.loras:
        path = names[id(lokr.org_module[0])]
        scale = float(lokr.scale) * float(lokr.multiplier) * float(lokr.scalar)
        state = lokr.custom_state_dict()
        for key, value in state.items():
            if key == "alpha":
                continue
            value = value.detach()
            if key in ("lokr_w1", "lokr_w1_a"):
                value = value * scale
            out[f"transformer.{path}.{key}"] = value.contiguous()
    return out
