"""Regional ``torch.compile`` of the Flux transformer blocks (``compile: true``).

Each ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` is compiled in place
(``nn.Module.compile``, what diffusers' ``compile_repeated_blocks`` does), so the graph is traced
once per block type rather than for the whole model: compile time stays short, parameter names do
not change (checkpoints and LoRA exports are unaffected), and TREAD routing, gradient checkpointing
and PEFT adapters run through the compiled blocks unchanged. Where the platform cannot compile, the
run continues eagerly with a one-line warning saying why.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

log = logging.getLogger(__name__)

BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def compile_unsupported_reason(transformer: torch.nn.Module, device_type: str, backend: str = "inductor") -> str | None:
    """Why ``torch.compile`` cannot be used here, or ``None`` when it can."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return f"torch.compile is not supported on this Python/platform (torch {torch.__version__})"
    except Exception as err:  # pragma: no cover - broken installs
        return f"torch._dynamo cannot be imported ({err})"
    if any(type(m).__name__ in ("Linear4bit", "Params4bit") for m in transformer.modules()):
        return "an NF4 (bitsandbytes) base cannot be compiled; use an int8 quanto or bf16 base to compile"
    if backend != "inductor":
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "the inductor backend needs triton on CUDA (pip install triton)"
    elif device_type == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "the inductor backend needs a C++ compiler on CPU (install g++ or clang++)"
    return None


def compile_blocks(transformer: torch.nn.Module, *, device_type: str | None = None, **compile_kwargs) -> bool:
    """Compile every transformer block of ``transformer`` in place; returns whether it did.

    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend``, ``mode``, ``dynamic``).
    ``device_type`` is where training will run (default: ``cuda`` when available, else ``cpu``).
    """
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    reason = compile_unsupported_reason(transformer, device_type, compile_kwargs.get("backend", "inductor"))
    if reason:
        log.warning("compile: true is ignored, training runs eagerly: %s", reason)
        return False
    blocks = [m for m in transformer.modules() if type(m).__name__ in BLOCK_CLASSES]
    if not blocks:
        log.warning("compile: true is ignored: %s has no Flux transformer blocks", type(transformer).__name__)
        return False
    for block in blocks:
        block.compile(**compile_kwargs)
    log.info("compiled %d transformer blocks (regional torch.compile)", len(blocks))
    return True


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` was compiled in place with ``nn.Module.compile``."""
    return getattr(module, "_compiled_call_impl", None) is not None
