"""Seconds per step and peak VRAM of a FLUX.1-dev LoRA step on one CUDA GPU (bf16, int8 quanto, NF4).

The full FLUX.1-dev transformer architecture (19 double + 38 single blocks, width 3072, 12B
parameters) is built with random weights directly on the GPU, so nothing is downloaded. Per base
precision (bf16, int8 optimum-quanto, NF4 bitsandbytes; norms, embedders, ``norm_out`` and the final
``proj_out`` stay bf16) it adds a rank-16 LoRA on target ``all`` and trains with flux_lightning's
own ``FluxLoRAModule`` in a ``lightning.Trainer`` (bf16-mixed, gradient checkpointing, batch 1,
torch's fused AdamW (the default ``optimizer=adamw``), clipping 1.0, 512 T5 tokens) at 512 px (1024 image tokens) and 1024 px (4096).
The ``bf16_compiled`` case is the bf16 base with the blocks compiled in place
(:func:`flux_lightning.model.compilation.compile_blocks`, what ``compile=true`` does; its compile time is
in ``setup_s`` and the warm-up steps).
Reports s/step over the steady state (after warm-up; one sync at each end), the peak allocated VRAM
beside the forecast of :mod:`flux_lightning.model.forecast` (``forecast_gb``), and the host-device syncs
inside the steady-state steps (``steady_state_syncs``: ``torch.cuda.set_sync_debug_mode("warn")``
is on from the first timed step to the one before the last, which logs; the goal is 0) as JSON, and
checks the targets (H100: >= 3 steps/s at 512 px bf16; peak <= 28 GB bf16, <= 17 GB int8,
<= 10 GB NF4 at 512 px). All eight cases take about 6-7 minutes on an H100 (an estimate: not yet run).

    PYTHONPATH=. python benchmarks/gpu_flux_step.py [--json benchmarks/results/gpu_flux_step.json]

Without CUDA it prints why and exits 0. ``--smoke`` runs the same code on a tiny architecture on
any device (a check that the script works, not a benchmark).

Note for maintainers: the quantization below calls optimum-quanto and bitsandbytes directly; the
library's own ``flux_lightning.model.quantization`` (when present) applies the same exclusions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

import torch

# the architecture is flux_lightning.model.forecast.FLUX1_TRANSFORMER (FLUX.1-dev's config); --smoke shrinks it
SMOKE = dict(
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
T5_TOKENS = 512
# bf16_compiled: the bf16 base with flux_lightning's regional torch.compile of the blocks (compile=true)
BASES = ("bf16", "bf16_compiled", "int8_quanto", "nf4_bnb")
RESOLUTIONS = (512, 1024)
# (base, resolution) -> (max peak GB, min steps/s) on an H100
TARGETS = {("bf16", 512): (28.0, 3.0), ("int8_quanto", 512): (17.0, None), ("nf4_bnb", 512): (10.0, None)}
HIGH_PRECISION = ("x_embedder", "context_embedder", "proj_out", "norm_out", "time_text_embed")


def keeps_high_precision(name: str) -> bool:
    """Embedders, ``norm_out`` and the final ``proj_out`` (top-level names) are never quantized."""
    return name.split(".")[0] in HIGH_PRECISION


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(arch: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random-weight ``FluxTransformer2DModel`` created directly on ``device`` in ``dtype``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = FluxTransformer2DModel(**arch)
    return model.requires_grad_(False)


def quantize_int8_quanto(model: torch.nn.Module) -> None:
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8, exclude=[f"{n}*" for n in HIGH_PRECISION])
    freeze(model)


def quantize_nf4_bnb(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace every quantizable ``nn.Linear`` by a bitsandbytes NF4 ``Linear4bit`` on its device."""
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not torch.nn.Linear or keeps_high_precision(name):
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4", module=q).to(
                child.weight.device
            )  # quantizes
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q)
    model.requires_grad_(False)


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def run_case(
    transformer,
    resolution: int,
    steps: int,
    warmup: int,
    device,
    precision: str,
    t5_tokens: int,
    text_dim: int,
    pooled_dim: int,
) -> dict:
    """Train ``warmup + steps`` steps with flux_lightning's module in a Lightning Trainer."""
    import warnings

    import lightning as L

    from flux_lightning import AdapterConfig, FluxLoRAModule, ModelConfig
    from flux_lightning.training.optim import build_optimizer

    class Clock(L.Callback):
        """Times the steady state (after ``warmup`` steps) with one sync at each end, and runs it under
        ``torch.cuda.set_sync_debug_mode("warn")``: every host-device sync inside a step warns (the
        last step is left out: it logs the loss)."""

        def __init__(self):
            self.start = self.end = None
            self.losses = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                self.start = time.perf_counter()
            elif batch_idx == warmup + steps - 1 and device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].detach())

        def on_train_end(self, *args):
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            self.end = time.perf_counter()

    side = resolution // 8
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "latents": torch.randn(16, side, side, generator=g),
            "prompt_embeds": torch.randn(t5_tokens, text_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(pooled_dim, generator=g),
        }
        for _ in range(steps + warmup)
    ]
    module = FluxLoRAModule(
        ModelConfig(flavour="dev"),
        AdapterConfig(rank=16, target="all"),
        optimizer=partial(build_optimizer, name="adamw", lr=1e-4),  # the default: torch's fused AdamW
    )
    module.transformer = transformer  # built above; configure_model() keeps it
    clock = Clock()
    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator=device.type,
        devices=1,
        precision=precision,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    loader = torch.utils.data.DataLoader(data, batch_size=1, pin_memory=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    per_step = (clock.end - clock.start) / steps
    out = {
        "resolution": resolution,
        "image_tokens": (side // 2) ** 2,
        "s_per_step": per_step,
        "steps_per_s": 1 / per_step,
        "final_loss": float(clock.losses[-1]),
        "steady_state_syncs": len(syncs),  # torch.cuda.set_sync_debug_mode("warn") over steps warmup..-2
        "sync_examples": sorted(set(syncs))[:5],
    }
    if device.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    # drop the optimizer state and LoRA grads before the next case
    for p in transformer.parameters():
        p.grad = None
    del trainer, module
    gc.collect()
    return out


def forecast_gb(base: str, resolution: int) -> float:
    """flux_lightning's VRAM forecast for the case (GB, as the peaks are reported)."""
    from flux_lightning import AdapterConfig, ModelConfig
    from flux_lightning.model.forecast import forecast
    from flux_lightning.model.quantization import QuantizationConfig

    precision = {"int8_quanto": "int8_quanto", "nf4_bnb": "nf4_bnb"}.get(base, "none")
    model = ModelConfig(flavour="dev", dtype="bf16", quantization=QuantizationConfig(precision))
    return forecast(model, AdapterConfig(rank=16, target="all"), resolution=resolution).total / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    parser.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=450, help="skip the remaining cases after this")
    parser.add_argument("--smoke", action="store_true", help="tiny architecture on any device: checks the script")
    parser.add_argument("--device", help="default: cuda (cpu only with --smoke)")
    parser.add_argument("--json", help="write the result here (it is printed either way)")
    args = parser.parse_args(argv)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_flux_step: skipped: no CUDA device here (this benchmark builds the 12B FLUX.1-dev "
            "architecture on a GPU); run it on a CUDA machine, or pass --smoke to check the script"
        )
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from flux_lightning.model.forecast import FLUX1_TRANSFORMER

    arch = {**FLUX1_TRANSFORMER, **SMOKE} if args.smoke else dict(FLUX1_TRANSFORMER)
    dtype = torch.bfloat16
    precision = "bf16-mixed"
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.resolutions = [r // 8 for r in args.resolutions]  # 64 and 128 px
    t5_tokens = 16 if args.smoke else T5_TOKENS

    from flux_lightning.adapters import AdapterConfig, add_lora

    started = time.monotonic()
    result = {
        "benchmark": "gpu_flux_step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "arch": "smoke" if args.smoke else "FLUX.1-dev (random weights)",
        "lora": "rank 16, target all",
        "batch_size": 1,
        "gradient_checkpointing": True,
        "precision": precision,
        "cases": [],
        "skipped": [],
    }
    for base in args.bases:
        if time.monotonic() - started > args.max_seconds:
            result["skipped"] += [f"{base}@{r}px: over --max-seconds" for r in args.resolutions]
            continue
        try:
            t0 = time.monotonic()
            transformer = build_transformer(arch, device, dtype)
            if base == "int8_quanto":
                quantize_int8_quanto(transformer)
            elif base == "nf4_bnb":
                quantize_nf4_bnb(transformer, compute_dtype=dtype)
            add_lora(transformer, AdapterConfig(rank=16, target="all"))
            transformer.enable_gradient_checkpointing()
            transformer.train()
            if base == "bf16_compiled":
                from flux_lightning.model.compilation import compile_blocks

                case_compiled = compile_blocks(transformer, device_type=device.type)
            gc.collect()
            setup_s = time.monotonic() - t0
            base_gb = weight_bytes(transformer) / 1e9
        except ImportError as err:
            result["skipped"] += [f"{base}: {err} (pip install 'flux-lightning[quanto,bnb]')"]
            continue
        for res in args.resolutions:
            if time.monotonic() - started > args.max_seconds:
                result["skipped"].append(f"{base}@{res}px: over --max-seconds")
                continue
            case = run_case(
                transformer,
                res,
                args.steps,
                args.warmup,
                device,
                precision,
                t5_tokens,
                arch["joint_attention_dim"],
                arch["pooled_projection_dim"],
            )
            case.update(base=base, weights_gb=base_gb, setup_s=setup_s)
            if not args.smoke:
                case["forecast_gb"] = forecast_gb(base, res)
            if base == "bf16_compiled":
                case["compiled"] = case_compiled  # False: compile_blocks said why (unsupported here)
            target = TARGETS.get((base, res)) if not args.smoke else None
            if target and device.type == "cuda":
                max_gb, min_rate = target
                case["target_peak_gb"] = max_gb
                case["peak_ok"] = case["peak_allocated_gb"] <= max_gb
                if min_rate:
                    case["target_steps_per_s"] = min_rate
                    case["speed_ok"] = case["steps_per_s"] >= min_rate
            result["cases"].append(case)
            peak = f", peak {case['peak_allocated_gb']:.1f} GB" if "peak_allocated_gb" in case else ""
            print(
                f"{base:12s} {res:5d}px  {case['s_per_step']:.3f} s/step ({case['steps_per_s']:.2f} steps/s){peak}",
                flush=True,
            )
        del transformer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["total_s"] = time.monotonic() - started
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
