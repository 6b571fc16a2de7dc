"""Adapters on the Flux transformer: LoRA (PEFT) and LoKr (LyCORIS, see :mod:`.lokr`).

LoRA: target presets, PEFT set-up, continuing from an existing LoRA file (``init_lora``) and a
frozen assistant LoRA stacked under the trained one. Writing files is :mod:`flux_lightning.export`.

The trained adapter is PEFT's adapter ``default``; the assistant is ``assistant`` (never trained,
never checkpointed or exported).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
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

INIT_TYPES = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
# inits that rewrite the frozen base weights: impossible on a quantized base
BASE_MODIFYING_INITS = ("pissa", "olora", "loftq")
ADAPTER_TYPES = ("lora", "lokr")
TRAINED, ASSISTANT = "default", "assistant"


@dataclass
class AdapterConfig:
    """Adapter hyper-parameters (``adapter=lora`` or ``adapter=lokr``).

    Attributes:
        type: ``lora`` (PEFT) or ``lokr`` (LyCORIS LoKr).
        rank: LoRA rank r; for LoKr the rank of the larger Kronecker factor (ignored with
            ``full_matrix``).
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. Null = rank (scale 1).
        dropout: dropout on the LoRA branch input during training (LoRA only).
        target: a preset name from :data:`TARGET_PRESETS` or an explicit list of module names
            (matched by suffix, as PEFT does); for LoKr also ``attention+ff`` (the quickstart's
            LyCORIS preset: every Linear in the attention and feed-forward modules).
        init: ``default`` (A Kaiming, B zero), ``gaussian``, ``pissa``, ``olora`` or ``loftq``.
            PiSSA/OLoRA move the principal part of W into the adapter; export converts back to a
            plain LoRA (rank 2r). LoftQ (CUDA + bitsandbytes) replaces W by its 4-bit NF4
            approximation Q and starts the LoRA at the best rank-r fit of W - Q: its LoRA is meant
            for an NF4 base at inference. None of these work on a quantized base.
        init_lora: continue from an existing adapter file (a LoRA in diffusers/kohya keys, or a
            LoKr exported by this library); its rank and targets must match this config.
        weight_dtype: dtype of the adapter weights, ``fp32`` or ``bf16``; null = what the optimizer
            wants (``adamw_bf16``: bf16, others fp32).
        factor: LoKr Kronecker factor (the smaller factor's side; -1 = as square as possible).
        ff_factor: LoKr factor for feed-forward modules with ``target=attention+ff``; null = factor.
        full_matrix: LoKr trains both Kronecker factors as full matrices (no low-rank split).
    """

    type: str = "lora"
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.1
    target: Any = "all"
    init: str = "default"
    init_lora: str | None = None
    weight_dtype: str | None = None
    factor: int = 16
    ff_factor: int | None = 8
    full_matrix: bool = True

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def resolve_targets(target: Any) -> list[str]:
    """Module-name suffixes for ``adapter.target`` (a preset name or a list of names)."""
    from .lokr import LYCORIS_PRESETS

    if isinstance(target, str) and target in LYCORIS_PRESETS:
        raise ValueError(f"adapter.target={target!r} is a LyCORIS preset; use it with adapter=lokr")
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


def adapter_problems(cfg: AdapterConfig, *, quantized: bool = False) -> list[str]:
    """Every invalid adapter field (and adapter/base combination), one line each with its fix."""
    from .lokr import LYCORIS_PRESETS

    out = []
    if cfg.type not in ADAPTER_TYPES:
        out.append(f"adapter.type={cfg.type!r} is unknown; use lora or lokr")
    elif cfg.type == "lokr":
        if not (isinstance(cfg.target, str) and cfg.target in LYCORIS_PRESETS):
            try:
                resolve_targets(cfg.target)
            except ValueError as err:
                out.append(f"{err} (or a LyCORIS preset: {', '.join(LYCORIS_PRESETS)})")
        if cfg.init != "default":
            out.append(f"adapter.init={cfg.init} is a LoRA initialisation; LoKr takes adapter.init=default")
        if cfg.factor == 0 or cfg.factor < -1:
            out.append(f"adapter.factor={cfg.factor} must be -1 or a positive integer")
        import importlib.util

        if importlib.util.find_spec("lycoris") is None:
            out.append("adapter=lokr needs the lycoris-lora package; pip install 'flux-lightning[lycoris]'")
    else:
        try:
            resolve_targets(cfg.target)
        except ValueError as err:
            out.append(str(err))
    if cfg.rank < 1:
        out.append(f"adapter.rank={cfg.rank} must be >= 1")
    if cfg.init not in INIT_TYPES:
        out.append(f"adapter.init={cfg.init!r} is unknown; use one of {sorted(INIT_TYPES)}")
    if not 0.0 <= cfg.dropout < 1.0:
        out.append(f"adapter.dropout={cfg.dropout} must be within [0, 1)")
    if cfg.weight_dtype not in (None, "fp32", "bf16"):
        out.append(f"adapter.weight_dtype={cfg.weight_dtype!r} is unknown; use fp32, bf16 or null")
    if cfg.init == "loftq" and not torch.cuda.is_available():
        out.append(
            "adapter.init=loftq needs a CUDA GPU and bitsandbytes (PEFT runs LoftQ's NF4 rounds on CUDA); "
            "use adapter.init=default here"
        )
    if quantized and cfg.init in BASE_MODIFYING_INITS:
        out.append(
            f"adapter.init={cfg.init} rewrites the base weights and cannot run on a quantized base; "
            "use quantization=none or adapter.init=default"
        )
    if cfg.init_lora:
        if not Path(cfg.init_lora).expanduser().is_file():
            out.append(f"adapter.init_lora: file '{cfg.init_lora}' does not exist; point it at a .safetensors adapter")
        if cfg.init != "default":
            out.append(
                f"adapter.init_lora replaces the initial adapter weights; adapter.init={cfg.init} "
                "would be discarded, use adapter.init=default"
            )
    return out


def add_adapter(transformer: torch.nn.Module, cfg: AdapterConfig, dtype: torch.dtype = torch.float32) -> None:
    """Add the trainable adapter of ``cfg`` to the frozen ``transformer`` (weights in ``dtype``);
    continue from ``cfg.init_lora`` when set."""
    if cfg.type == "lokr":
        from .lokr import add_lokr, load_lokr_weights

        add_lokr(transformer, cfg)
        if cfg.init_lora:
            load_lokr_weights(transformer, cfg.init_lora)
    else:
        add_lora(transformer, cfg)
        if cfg.init_lora:
            load_init_lora(transformer, cfg, cfg.init_lora)
    cast_adapter(transformer, dtype)


def trainable_adapter_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def cast_adapter(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold the trainable adapter weights in ``dtype`` (the frozen base is untouched)."""
    for param in trainable_adapter_parameters(transformer).values():
        param.data = param.data.to(dtype)


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

    return {k: v.detach() for k, v in get_peft_model_state_dict(transformer, adapter_name=TRAINED).items()}


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
        path = path / (weight_name or LORA_FILENAME)
    elif not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, weight_name or LORA_FILENAME))
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
