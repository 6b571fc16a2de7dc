"""PEFT LoRA on the Flux transformer: set-up, continuing from a LoRA file (``init_lora``) and a
frozen assistant LoRA stacked under the trained one. Writing files is :mod:`.export`.

The trained adapter is PEFT's adapter ``default``; the assistant is ``assistant`` (never trained,
never checkpointed or exported).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import ADAPTER_FILENAME, BASE_MODIFYING_INITS, INIT_TYPES, AdapterConfig, resolve_targets

TRAINED, ASSISTANT = "default", "assistant"


def add_lora(transformer: torch.nn.Module, cfg: AdapterConfig) -> None:
    """Inject a trainable LoRA (fp32, PEFT adapter ``default``) into the frozen ``transformer``."""
    from peft import LoraConfig, inject_adapter_in_model

    if cfg.type != "lora":
        raise ValueError(f"adapter.type={cfg.type!r}: add_lora builds LoRA only; use add_adapter")
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
    if cfg.init in BASE_MODIFYING_INITS and getattr(transformer, "flux_lightning_quantization", None):
        raise ValueError(
            f"adapter.init={cfg.init} rewrites the base weights and cannot run on a quantized base; "
            "use quantization=none or adapter.init=default"
        )
    extra = {}
    if cfg.init == "loftq":
        from peft import LoftQConfig

        extra["loftq_config"] = LoftQConfig(loftq_bits=4, loftq_iter=1)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights=INIT_TYPES[cfg.init],
        use_dora=cfg.use_dora,
        **extra,
    )
    with warnings.catch_warnings():  # PEFT warns that a second adapter joins the assistant: intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, transformer, adapter_name=TRAINED)
    transformer._flux_lightning_lora_config = config
    if has_assistant(transformer):
        set_active_adapters(transformer, [ASSISTANT, TRAINED])
    initial = {}
    for name, param in transformer.named_parameters():
        trained = "lora_" in name and f".{TRAINED}." in name
        if trained:
            param.data = param.data.float()
            if cfg.init in ("pissa", "olora"):
                initial[name] = param.detach().clone()
        param.requires_grad_(trained)
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

    state = None
    named = dict(transformer.named_parameters())
    if any(_FSDP_PREFIX in n for n in named):  # blocks wrapped by FSDP (inside strategies.gathered): its names
        state = {n: p for n, p in named.items() if "lora_" in n}
    found = get_peft_model_state_dict(transformer, state_dict=state, adapter_name=TRAINED)
    return {k.replace(_FSDP_PREFIX, ""): v.detach() for k, v in found.items()}


_FSDP_PREFIX = "_fsdp_wrapped_module."


# -- reading LoRA files ---------------------------------------------------------------------------
def read_lora_file(source: str, weight_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Load a LoRA file (diffusers, kohya, xlabs ... keys) as diffusers keys.

    ``source`` is a ``.safetensors`` file, a folder, or a hub repo id (with ``weight_name``).
    Returns ``(state_dict, network_alphas, metadata)`` with keys ``transformer.<module>.lora_A.weight``.
    """
    from diffusers import FluxPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / (weight_name or ADAPTER_FILENAME)
    elif not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, weight_name or ADAPTER_FILENAME))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    state, alphas = FluxPipeline.lora_state_dict(load_file(str(path)), return_alphas=True)
    return state, alphas or {}, metadata


def _file_alpha(metadata: dict, rank: int) -> float | None:
    """The LoRA alpha a file was trained with, from its metadata (None when it does not say)."""
    if "lora_alpha" in metadata:
        return float(metadata["lora_alpha"])
    if "lora_adapter_metadata" in metadata:
        config = json.loads(metadata["lora_adapter_metadata"])
        alpha = config.get("transformer.lora_alpha", config.get("lora_alpha"))
        return None if alpha is None else float(alpha)
    return None


def load_init_lora(transformer: torch.nn.Module, cfg: AdapterConfig, source: str) -> None:
    """Copy the tensors of the LoRA file ``source`` into the trained adapter.

    The file must wrap exactly the modules ``cfg.target`` selects, at rank ``cfg.rank``. If the
    file's alpha differs from ``cfg.lora_alpha``, ``lora_B`` is rescaled by ``(alpha_file/r)/(alpha/r)``
    so that the starting update ``(alpha/r) B A`` equals the file's. A file that states no alpha
    (no metadata, no ``.alpha`` tensors) means ``alpha = r``, as diffusers and ComfyUI apply it.
    """
    from peft.utils import set_peft_model_state_dict

    state, alphas, metadata = read_lora_file(source)
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    ours = lora_state_dict(transformer)
    mod = lambda keys: {k.rsplit(".lora_", 1)[0] for k in keys}  # noqa: E731
    theirs_mods, ours_mods = mod(state), mod(ours)
    if theirs_mods != ours_mods:
        extra, missing = sorted(theirs_mods - ours_mods), sorted(ours_mods - theirs_mods)
        raise ValueError(
            f"adapter.init_lora: {source} wraps other modules than adapter.target={cfg.target!r} "
            f"(only in the file: {extra[:3]}{'...' if len(extra) > 3 else ''}; only in the config: "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}); set adapter.target to the file's targets"
        )
    ranks = sorted({v.shape[0] for k, v in state.items() if ".lora_A." in k})
    if ranks != [cfg.rank]:
        raise ValueError(
            f"adapter.init_lora: {source} has rank {ranks[0] if len(ranks) == 1 else ranks} but "
            f"adapter.rank={cfg.rank}; set adapter.rank to the file's rank"
        )
    file_alpha = _file_alpha(metadata, cfg.rank)
    if file_alpha is None and alphas:
        file_alpha = float(next(iter(alphas.values())))
    scale = (cfg.rank if file_alpha is None else file_alpha) / cfg.lora_alpha
    state = {k: (v * scale if ".lora_B." in k else v) for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=TRAINED)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter.init_lora: {source} has tensors this adapter lacks: {unexpected[:3]}")


# -- the frozen assistant LoRA --------------------------------------------------------------------
def has_assistant(transformer: torch.nn.Module) -> bool:
    return ASSISTANT in getattr(transformer, "peft_config", {})


def add_assistant_lora(transformer: torch.nn.Module, source: str, weight_name: str | None = None) -> None:
    """Load the LoRA at ``source`` as the frozen PEFT adapter ``assistant``.

    Call before :func:`add_adapter`: the trained adapter is then stacked on top, and both deltas add
    to the base weight, ``W x + s_a B_a A_a x + s B A x``.
    """
    state, alphas, metadata = read_lora_file(source, weight_name)
    kwargs = {}
    if "lora_adapter_metadata" in metadata:  # keys keep "transformer.": load_lora_adapter strips it
        kwargs["metadata"] = json.loads(metadata["lora_adapter_metadata"])
    else:
        kwargs["network_alphas"] = alphas or None
    transformer.load_lora_adapter(state, adapter_name=ASSISTANT, prefix="transformer", **kwargs)
    for name, param in transformer.named_parameters():
        if f".{ASSISTANT}." in name:
            param.requires_grad_(False)


def set_active_adapters(transformer: torch.nn.Module, names: list[str]) -> None:
    """Activate exactly the PEFT adapters ``names``; only the trained one stays trainable."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([n for n in names if n in module.lora_A or n in getattr(module, "lora_B", {})])
    for name, param in transformer.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(f".{TRAINED}." in name and TRAINED in names)


@contextmanager
def assistant_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """Inside the block the assistant LoRA is off (validation renders what the trained LoRA does)."""
    if not has_assistant(transformer):
        yield
        return
    trained = TRAINED in getattr(transformer, "peft_config", {})
    set_active_adapters(transformer, [TRAINED] if trained else [])
    try:
        yield
    finally:
        set_active_adapters(transformer, [ASSISTANT, TRAINED] if trained else [ASSISTANT])
