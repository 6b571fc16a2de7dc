"""Quantize the frozen Flux transformer (``quantization=`` group): optimum-quanto or bitsandbytes.

Only ``nn.Linear`` layers are quantized. Kept in high precision: the normalisation layers (their
weights are never Linear, so they stay as loaded), the input embedders ``x_embedder`` and
``context_embedder``, the final ``norm_out`` (including its modulation Linear) and the final
``proj_out``. The adaptive-norm modulation Linears inside the blocks are ordinary projections and are
quantized, as other Flux trainers do.

Weights after quantization (per quantized Linear with ``out x in`` weights, bf16 base):
int8/fp8 ``out*in`` bytes + a bf16 scale per row; int4/int2 ``out*in/2`` resp. ``/4`` bytes + bf16
scale and shift per group; NF4 ``out*in/2`` bytes + absmax per 64-block. Adapters trained on top
stay in their own dtype and are the only thing that is checkpointed or exported.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ..errors import Problem

log = logging.getLogger(__name__)

QUANTO_PRECISIONS = ("int8_quanto", "int4_quanto", "int2_quanto", "fp8_quanto")
BNB_PRECISIONS = ("nf4_bnb",)
PRECISIONS = ("none", *QUANTO_PRECISIONS, *BNB_PRECISIONS)
TEXT_ENCODER_PRECISIONS = ("no_change", *QUANTO_PRECISIONS)
QUANTIZE_VIA = ("cpu", "accelerator")
DEFAULT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Linear layers (by full module name) that stay in high precision.
KEEP_HIGH_PRECISION = ("x_embedder", "context_embedder", "norm_out.linear", "proj_out")


@dataclass
class QuantizationConfig:
    """How the frozen base is held (``quantization=<choice>``; packaged at ``model.quantization``).

    Attributes:
        base_model_precision: ``none``, ``int8_quanto``, ``int4_quanto``, ``int2_quanto``,
            ``fp8_quanto`` (optimum-quanto) or ``nf4_bnb`` (bitsandbytes; its CPU backend works too).
        quantize_via: where quantization runs: ``accelerator`` (the GPU when there is one; fast,
            needs the bf16 transformer to fit in VRAM once) or ``cpu`` (slower, for <= 16 GB cards).
        base_model_default_dtype: dtype of everything not quantized and of the compute:
            ``bf16`` or ``fp32``; null = ``model.dtype``.
        text_encoder_precision: precision of the T5/CLIP text encoders while caching embeddings:
            ``no_change`` or one of the quanto choices (changes the text cache key).
    """

    base_model_precision: str = "none"
    quantize_via: str = "accelerator"
    base_model_default_dtype: str | None = None
    text_encoder_precision: str = "no_change"

    @property
    def quantized(self) -> bool:
        return self.base_model_precision != "none"

    def problems(self) -> list[Problem]:
        """Every invalid field, one line each, naming the field and the fix."""
        out = []
        if self.base_model_precision not in PRECISIONS:
            out.append(
                Problem(
                    "model.quantization.base_model_precision",
                    f"quantization.base_model_precision={self.base_model_precision!r} is unknown; "
                    f"use one of {', '.join(PRECISIONS)}",
                )
            )
        if self.quantize_via not in QUANTIZE_VIA:
            out.append(
                Problem(
                    "model.quantization.quantize_via",
                    f"quantization.quantize_via={self.quantize_via!r} is unknown; use cpu or accelerator",
                )
            )
        if self.base_model_default_dtype not in (None, *DEFAULT_DTYPES):
            out.append(
                Problem(
                    "model.quantization.base_model_default_dtype",
                    f"quantization.base_model_default_dtype={self.base_model_default_dtype!r} is unknown; "
                    "use bf16, fp32 or null (= model.dtype)",
                )
            )
        if self.text_encoder_precision not in TEXT_ENCODER_PRECISIONS:
            out.append(
                Problem(
                    "model.quantization.text_encoder_precision",
                    f"quantization.text_encoder_precision={self.text_encoder_precision!r} is unknown; "
                    f"use one of {', '.join(TEXT_ENCODER_PRECISIONS)}",
                )
            )
        for precision, field_name in (
            (self.base_model_precision, "base_model_precision"),
            (self.text_encoder_precision, "text_encoder_precision"),
        ):
            hint = dependency_problem(precision)
            if hint:
                out.append(
                    Problem(f"model.quantization.{field_name}", f"quantization.{field_name}={precision}: {hint}")
                )
        return out


def dependency_problem(precision: str) -> Problem | None:
    """Why ``precision`` cannot run in this environment (missing package / no GPU), else None."""
    import importlib.util

    if precision in QUANTO_PRECISIONS and importlib.util.find_spec("optimum.quanto") is None:
        return "needs optimum-quanto; pip install 'flux-lightning[quanto]'"
    if precision in BNB_PRECISIONS:
        if importlib.util.find_spec("bitsandbytes") is None:
            return "needs bitsandbytes; pip install 'flux-lightning[bnb]'"
        if not torch.cuda.is_available() and not bnb_runs_on_cpu():
            return (
                "this bitsandbytes build cannot quantize on the CPU and no CUDA GPU is visible; "
                "use a GPU, bitsandbytes>=0.48, or quantization=int4_quanto"
            )
    return None


@functools.cache
def bnb_runs_on_cpu() -> bool:
    """Whether bitsandbytes can NF4-quantize and run a Linear on the CPU here (a 64x64 probe)."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu")
        return bool(torch.isfinite(layer(torch.randn(2, 64))).all())
    except Exception:
        return False


def quantizable_linears(model: torch.nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` layers that quantization replaces (see module docstring)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in KEEP_HIGH_PRECISION
    ]


def _quanto_qtype(precision: str):
    from optimum import quanto

    return {
        "int8_quanto": quanto.qint8,
        "int4_quanto": quanto.qint4,
        "int2_quanto": quanto.qint2,
        "fp8_quanto": quanto.qfloat8,
    }[precision]


def _quantize_quanto(model: torch.nn.Module, precision: str) -> None:
    from optimum.quanto import freeze, quantize

    names = quantizable_linears(model)
    # fnmatch patterns: the plain names below contain no wildcard characters, so they match exactly
    quantize(model, weights=_quanto_qtype(precision), include=names)
    freeze(model)


def _quantize_nf4(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Swap each quantizable Linear for ``bitsandbytes.nn.Linear4bit`` (NF4), quantized on ``device``."""
    import bitsandbytes as bnb

    for name in quantizable_linears(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old: torch.nn.Linear = getattr(parent, attr)
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4")
        if hasattr(new, "support_avx512bf16_for_cpu"):
            # bitsandbytes repacks the weight for a CPU inference kernel on the first eval-mode call
            # (validation, eval loss) and the packed layout then breaks training steps; it also
            # assumes in_features >= its block size (64). A base we train on keeps the generic kernel.
            new.support_avx512bf16_for_cpu = False
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, attr, new.to(device))  # Params4bit quantizes when moved to a device


def quantize_transformer(
    model: torch.nn.Module, cfg: QuantizationConfig, compute_dtype: torch.dtype
) -> torch.nn.Module:
    """Quantize the frozen ``model`` in place according to ``cfg``; returns it (on CPU).

    ``quantize_via=accelerator`` runs the quantization on the GPU when there is one, then moves
    the result back to the CPU so that Lightning places it like any other module.
    """
    if not cfg.quantized:
        return model
    hint = dependency_problem(cfg.base_model_precision)
    if hint:
        raise RuntimeError(f"quantization.base_model_precision={cfg.base_model_precision}: {hint}")
    device = torch.device("cpu")
    if cfg.quantize_via == "accelerator":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            log.info("quantize_via=accelerator but no GPU is visible: quantizing on the CPU")
    model.requires_grad_(False)
    model.to(device)
    if cfg.base_model_precision in QUANTO_PRECISIONS:
        _quantize_quanto(model, cfg.base_model_precision)
    else:
        _quantize_nf4(model, device, compute_dtype)
    model.flux_lightning_quantization = cfg.base_model_precision
    if device.type != "cpu":
        model.to("cpu")
        torch.cuda.empty_cache()
    return model


def quantize_text_encoder(encoder: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Weight-quantize a frozen text encoder with quanto (``no_change`` returns it untouched)."""
    if precision == "no_change":
        return encoder
    from optimum.quanto import freeze, quantize

    quantize(encoder, weights=_quanto_qtype(precision))
    freeze(encoder)
    return encoder


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every ``weight`` tensor in ``model.state_dict()`` (quantized data, scales and shifts
    included; biases and buffers excluded)."""
    total = 0
    for key, value in model.state_dict().items():
        if key.endswith(".weight") or ".weight." in key:
            total += value.numel() * value.element_size()
    return total
