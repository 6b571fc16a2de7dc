"""VRAM forecast: a run's peak accelerator memory, predicted before anything loads.

``peak = weights + adapter + activations``, each from facts known before loading:

* **weights** of the frozen transformer, exactly, from its config (the folder's
  ``transformer/config.json`` when the source is a local folder, else the flavour's known FLUX.1
  config) by counting every parameter of diffusers' ``FluxTransformer2DModel`` (:func:`linears`;
  ``tests/model/test_forecast.py`` checks the count against the model built on the meta device) in the
  base dtype, or quantized (:data:`QUANTIZED_BYTES`: bytes per weight of ``nn.Linear`` layers,
  scales included; the layers :data:`flux_lightning.model.quantization.KEEP_HIGH_PRECISION` stay in the
  base dtype). Group offload keeps the blocks' linear weights on the host: one block's remain.
* **adapter**: LoRA parameters on the targeted layers (PEFT's name matching), their gradients,
  the optimizer's state and the non-finite guard's copy of both (:mod:`flux_lightning.training.guard`).
* **activations** per token of the joint sequence (image + text (+ reference) tokens) per block,
  measured at FLUX.1's real width on the CPU (``benchmarks/activation_profile.py``:
  :data:`SAVED_BYTES_PER_TOKEN`), scaled by the blocks, the batch and the compute dtype. A block that
  gradient checkpointing recomputes keeps only its input (``width`` values per token) until its
  backward pass, which holds one block's activations again; plus a backward workspace
  (:data:`WORKSPACE_BYTES_PER_TOKEN`, the peak above the saved tensors measured in
  ``benchmarks/memory_vs_reference.py``).

Not counted: the CUDA context and allocator fragmentation (about 0.5-1 GB on a GPU; the warning
against a GPU's memory keeps :data:`HEADROOM_BYTES` free), validation renders (the VAE decode at the
validation resolution) and text encoders (never resident while training: embeddings are cached).
Library core: no torch model is built, nothing is imported beyond the config modules.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3

#: FLUX.1 [dev] / [schnell] / Krea / Kontext transformer (diffusers ``FluxTransformer2DModel`` config).
FLUX1_TRANSFORMER = dict(
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    in_channels=64,
    patch_size=1,
    out_channels=None,
    guidance_embeds=True,
)

#: bytes per weight of a quantized ``nn.Linear`` (scales/shifts included), per base precision:
#: quanto int8/fp8 one byte + a bf16 scale per output row (added per layer); int4/int2 with group
#: size 128 (bf16 scale + shift per group); bitsandbytes NF4: half a byte + a double-quantized
#: absmax per 64-block (one byte, plus an fp32 per 256 of those).
QUANTIZED_BYTES = {
    "int8_quanto": 1.0,
    "fp8_quanto": 1.0,
    "int4_quanto": 0.5 + 4 / 128,
    "int2_quanto": 0.25 + 4 / 128,
    "nf4_bnb": 0.5 + 1 / 64 + 4 / (64 * 256),
}
_ROW_SCALE = ("int8_quanto", "fp8_quanto")

#: optimizer state tensors per trainable parameter, and their bytes (None = the adapter's dtype)
OPTIMIZER_STATE = {
    "adamw": (2, None),
    "adamw_bf16": (2, 2),
    "optimi_lion": (1, None),
    "optimi_stableadamw": (2, None),
    "adamw8bit": (2, 1),
    "lion8bit_paged": (1, 1),
    "prodigy": (4, None),
    "adafactor": (1, None),
    "sgd": (0, None),
}

#: Bytes autograd keeps per token of the joint sequence, per block, for the backward pass, with
#: bf16 compute (``bf16-mixed`` / ``model.dtype=bf16``), LoRA on the attention projections;
#: ``benchmarks/activation_profile.py`` at FLUX.1's width 3072 (the same figure at 256 and 512 px).
#: ``outside`` = embedders, final norm, projection and loss. fp32 compute doubles them.
SAVED_BYTES_PER_TOKEN = {"double": 88_156, "single": 86_804, "outside": 6_321}
#: peak above weights + adapter + saved tensors, per token (bf16, width 3072): the backward pass's
#: gradients of one block's activations and temporaries. Calibrated on the step peaks of
#: ``benchmarks/memory_vs_reference.py`` (0.29-0.33 MiB per token in all four cells, 256 / 512 px,
#: checkpointing off / on: linear in the tokens, no constant). Taken as independent of the depth
#: (one block's backward at a time); ``benchmarks/gpu_flux_step.py`` checks it at 57 blocks.
WORKSPACE_BYTES_PER_TOKEN = 320_000
#: memory a GPU must keep free beyond the forecast: CUDA context, allocator fragmentation
HEADROOM_BYTES = int(1.5 * GIB)


# -- the transformer's parameters --------------------------------------------------------------
def linears(config: dict) -> list[tuple[str, int, int]]:
    """``(full name, out_features, in_features)`` of every ``nn.Linear`` in diffusers'
    ``FluxTransformer2DModel`` with ``config`` (all have a bias)."""
    c = {**FLUX1_TRANSFORMER, **config}
    d = c["num_attention_heads"] * c["attention_head_dim"]
    out_ch = (c.get("out_channels") or c["in_channels"]) * c["patch_size"] ** 2
    out = [
        ("time_text_embed.timestep_embedder.linear_1", d, 256),
        ("time_text_embed.timestep_embedder.linear_2", d, d),
        ("time_text_embed.text_embedder.linear_1", d, c["pooled_projection_dim"]),
        ("time_text_embed.text_embedder.linear_2", d, d),
        ("context_embedder", d, c["joint_attention_dim"]),
        ("x_embedder", d, c["in_channels"]),
        ("norm_out.linear", 2 * d, d),
        ("proj_out", out_ch, d),
    ]
    if c["guidance_embeds"]:
        out += [
            ("time_text_embed.guidance_embedder.linear_1", d, 256),
            ("time_text_embed.guidance_embedder.linear_2", d, d),
        ]
    for i in range(c["num_layers"]):
        p = f"transformer_blocks.{i}."
        out += [(p + "norm1.linear", 6 * d, d), (p + "norm1_context.linear", 6 * d, d)]
        out += [
            (p + f"attn.{n}", d, d)
            for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
        ]
        for ff in ("ff", "ff_context"):
            out += [(p + f"{ff}.net.0.proj", 4 * d, d), (p + f"{ff}.net.2", d, 4 * d)]
    for i in range(c["num_single_layers"]):
        p = f"single_transformer_blocks.{i}."
        out += [(p + "norm.linear", 3 * d, d), (p + "proj_mlp", 4 * d, d), (p + "proj_out", d, 5 * d)]
        out += [(p + f"attn.{n}", d, d) for n in ("to_q", "to_k", "to_v")]
    return out


def other_parameters(config: dict) -> int:
    """Parameters outside the linear layers: the RMSNorms of queries and keys (``head_dim`` each)."""
    c = {**FLUX1_TRANSFORMER, **config}
    return c["attention_head_dim"] * (4 * c["num_layers"] + 2 * c["num_single_layers"])


def parameter_count(config: dict) -> int:
    """Every parameter of the transformer (weights and biases)."""
    return sum(o * i + o for _, o, i in linears(config)) + other_parameters(config)


def _in_block(name: str) -> bool:
    return name.startswith(("transformer_blocks.", "single_transformer_blocks."))


def weight_bytes(config: dict, dtype_bytes: int, precision: str = "none", *, offloaded: bool = False) -> int:
    """Bytes of the frozen transformer on the accelerator: every parameter in ``dtype_bytes``, or the
    quantizable linear weights at :data:`QUANTIZED_BYTES` (biases stay in the base dtype). With
    ``offloaded`` (group offload) the blocks' linear weights live on the host except one block's."""
    from .quantization import KEEP_HIGH_PRECISION

    total = other_parameters(config) * dtype_bytes
    block_sizes: dict[str, int] = {}
    for name, o, i in linears(config):
        if precision != "none" and name not in KEEP_HIGH_PRECISION:
            size = math.ceil(o * i * QUANTIZED_BYTES[precision]) + o * dtype_bytes
            size += o * 2 if precision in _ROW_SCALE else 0
        else:
            size = (o * i + o) * dtype_bytes
        if offloaded and _in_block(name):
            block = ".".join(name.split(".")[:2])
            block_sizes[block] = block_sizes.get(block, 0) + size
        else:
            total += size
    return total + max(block_sizes.values(), default=0)


def _peft_match(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def adapter_parameters(config: dict, targets: list[str], rank: int) -> int:
    """LoRA parameters ``rank * (in + out)`` on every linear layer PEFT's name matching selects."""
    return sum(rank * (o + i) for name, o, i in linears(config) if _peft_match(name, targets))


# -- where the config comes from ----------------------------------------------------------------
def transformer_config(model) -> dict:
    """The transformer config of a run's ``model`` node (:class:`~flux_lightning.model.config.ModelConfig`)
    without loading it: a local folder's ``config.json``, the tiny flavour's sizes, else FLUX.1's."""
    source, sub = model.pretrained_transformer_model_name_or_path, model.pretrained_transformer_subfolder
    if not source:
        source, sub = model.pretrained_model_name_or_path, "transformer"
    if source and not str(source).startswith("tiny://"):
        folder = Path(os.path.expanduser(str(source)))
        for candidate in ((folder / sub) if sub and sub != "none" else folder, folder):
            path = candidate / "config.json"
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    break
                if "num_single_layers" in data:
                    return {k: data[k] for k in FLUX1_TRANSFORMER if k in data}
    spec = model.spec
    if model.flavour == "tiny" and not source:
        from .tiny import TINY_SIZES

        s = TINY_SIZES
        return dict(
            num_layers=s["num_layers"],
            num_single_layers=s["num_single_layers"],
            attention_head_dim=s["head_dim"],
            num_attention_heads=s["heads"],
            joint_attention_dim=s["hidden"],
            pooled_projection_dim=s["hidden"],
            guidance_embeds=spec.guidance_embeds,
        )
    return {**FLUX1_TRANSFORMER, "guidance_embeds": spec.guidance_embeds}


# -- the forecast ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forecast:
    """Predicted peak accelerator memory of one training process, in bytes, by part."""

    weights: int
    adapter: int
    activations: int
    parameters: int  # of the base transformer
    adapter_parameters: int
    tokens: int  # joint sequence per sample (image + text + reference)
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations

    def line(self, label: str = "VRAM forecast") -> str:
        """One line for the start of a run, the wizard and the web UI."""
        return (
            f"{label}: {_size(self.total)} peak (weights {_size(self.weights)}, adapter + optimizer "
            f"{_size(self.adapter)}, activations {_size(self.activations)}; "
            f"{self.tokens} tokens/sample{', ' + self.note if self.note else ''})"
        )

    def warning(self, memory_bytes: int, name: str = "the GPU") -> str | None:
        """A one-line warning when the forecast plus :data:`HEADROOM_BYTES` exceeds ``memory_bytes``."""
        if self.total + HEADROOM_BYTES <= memory_bytes:
            return None
        return (
            f"WARNING: the VRAM forecast ({self.total / GIB:.1f} GiB + {HEADROOM_BYTES / GIB:.1f} GiB headroom) exceeds "
            f"{name} ({memory_bytes / GIB:.1f} GiB): quantize the base (quantization=int8_quanto / nf4_bnb), lower "
            "dataset.resolution or dataset.batch_size, keep model.gradient_checkpointing=true, or "
            "model.enable_group_offload=true"
        )

    def as_dict(self) -> dict:
        return {
            "total_gib": round(self.total / GIB, 2),
            "weights_gib": round(self.weights / GIB, 2),
            "adapter_gib": round(self.adapter / GIB, 3),
            "activations_gib": round(self.activations / GIB, 2),
            "parameters": self.parameters,
            "adapter_parameters": self.adapter_parameters,
            "tokens": self.tokens,
            "line": self.line(),
        }


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024**2:.0f} MiB"


def activation_bytes(
    config: dict, tokens: int, batch: int, compute_bytes: int, checkpointing: bool, interval: int = 1
) -> int:
    """Bytes of the saved activations and backward workspace of one step (see the module docstring)."""
    c = {**FLUX1_TRANSFORMER, **config}
    width = c["num_attention_heads"] * c["attention_head_dim"]
    scale = width / 3072 * compute_bytes / 2  # constants measured at width 3072, bf16
    per = {k: v * scale for k, v in SAVED_BYTES_PER_TOKEN.items()}
    kinds = ["double"] * c["num_layers"] + ["single"] * c["num_single_layers"]
    recomputed = set(range(0, len(kinds), interval)) if checkpointing else set()
    saved = per["outside"]
    for i, kind in enumerate(kinds):
        saved += width * compute_bytes if i in recomputed else per[kind]
    if recomputed:  # the backward pass of a recomputed block holds its activations again
        saved += max(per[kinds[i]] for i in recomputed)
    saved += WORKSPACE_BYTES_PER_TOKEN * scale
    return int(saved * tokens * batch)


def forecast(
    model,
    adapter,
    *,
    resolution: int,
    batch_size: int = 1,
    optimizer: str = "adamw",
    compute_bytes: int | None = None,
    reference_tokens: bool | None = None,
) -> Forecast:
    """Forecast for a ``ModelConfig`` + ``AdapterConfig`` training at ``resolution`` px (square;
    the token count of a bucket of the same area is the same), ``batch_size`` samples."""
    from ..adapters.config import resolve_targets
    from ..training.optim import adapter_dtype

    config = transformer_config(model)
    base_dtype = model.quantization.base_model_default_dtype or model.dtype
    base_bytes = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 2}.get(base_dtype, 2)
    compute_bytes = compute_bytes or base_bytes
    precision = model.quantization.base_model_precision
    weights = weight_bytes(config, base_bytes, precision, offloaded=model.enable_group_offload)
    try:
        targets = resolve_targets(adapter.target)
    except ValueError:  # LyCORIS presets: every attention and feed-forward linear
        targets = [n for n, _, _ in linears(config) if _in_block(n) and ".norm" not in n]
    n_adapter = adapter_parameters(config, targets, adapter.rank)
    a_bytes = 2 if (adapter.weight_dtype or adapter_dtype(optimizer)) == "bf16" else 4
    states, state_bytes = OPTIMIZER_STATE.get(optimizer, (2, None))
    state = n_adapter * states * (state_bytes or a_bytes)
    # weights + gradients + optimizer state, and the guard's copy of weights + state
    adapter_total = n_adapter * a_bytes * 2 + state + (n_adapter * a_bytes + state)
    latent_side = resolution // 16  # 8x VAE, 2x2 packing
    tokens = latent_side * latent_side + model.spec.t5_max_length
    if reference_tokens if reference_tokens is not None else model.spec.reference_conditioning:
        tokens += latent_side * latent_side
    activations = activation_bytes(
        config, tokens, batch_size, compute_bytes, model.gradient_checkpointing, model.gradient_checkpointing_interval
    )
    note = [f"{resolution} px x {batch_size}"]
    if precision != "none":
        note.append(precision)
    if model.enable_group_offload:
        note.append("group offload")
    if not model.gradient_checkpointing:
        note.append("no gradient checkpointing")
    return Forecast(weights, adapter_total, activations, parameter_count(config), n_adapter, tokens, ", ".join(note))


def forecast_run(run) -> Forecast:
    """The forecast of a validated :class:`~flux_lightning.config.validation.RunConfig` (the largest image
    backend's area; its batch size)."""
    dataset = run.dataset
    return forecast(
        run.model,
        run.adapter,
        resolution=resolution_px(dataset),
        batch_size=int(dataset.batch_size or 1),
        optimizer=getattr(run.optimizer, "name", None) or "adamw",
    )


def _area(resolution: float, resolution_type: str) -> float:
    if resolution_type == "area":  # megapixels, 1.0 = 1024^2
        return float(resolution) * 1024**2
    return float(resolution) ** 2  # pixel (shorter side: the square's area) and pixel_area


def resolution_px(dataset) -> int:
    """The side of the square with the largest training area among the dataset's image backends."""
    try:
        backends = [b for b in dataset.image_backends() if getattr(b, "dataset_type", "image") == "image"]
    except Exception:  # noqa: BLE001 - an unvalidated node: the shorthand's value
        backends = []
    areas = [_area(b.resolution, b.resolution_type) for b in backends]
    if not areas:
        areas = [_area(dataset.resolution or 1024, "pixel")]
    return int(round(math.sqrt(max(areas)) / 16) * 16)


def forecast_plan(plan) -> Forecast:
    """The forecast of the configure wizard's :class:`~flux_lightning.wizard.plan.Plan` (flavour,
    quantization and its memory overrides, resolution, batch size, adapter, optimizer)."""
    from ..adapters.config import AdapterConfig
    from .config import ModelConfig
    from .quantization import QuantizationConfig

    overrides = dict(getattr(plan, "memory_overrides", {}) or {})
    model = ModelConfig(
        flavour=plan.flavour,
        dtype="bf16",
        gradient_checkpointing=bool(overrides.get("model.gradient_checkpointing", True)),
        gradient_checkpointing_interval=int(overrides.get("model.gradient_checkpointing_interval", 1)),
        enable_group_offload=bool(overrides.get("model.enable_group_offload", False)),
        quantization=QuantizationConfig(
            base_model_precision=plan.quantization,
            base_model_default_dtype=overrides.get("model.quantization.base_model_default_dtype"),
        ),
    )
    if plan.adapter == "lokr":
        adapter = AdapterConfig(type="lokr", rank=getattr(plan, "rank", 16), target="attention+ff")
    else:
        adapter = AdapterConfig(rank=plan.rank)
    return forecast(
        model, adapter, resolution=int(plan.resolution), batch_size=int(plan.batch_size), optimizer=plan.optimizer
    )


def gpu_warnings(fc: Forecast, accelerators) -> list[str]:
    """Warnings for every detected GPU (``hardware.detect_accelerators()``) the forecast does not fit."""
    out = []
    for acc in accelerators:
        w = fc.warning(acc.memory_bytes, f"cuda:{acc.index} {acc.name}")
        if w:
            out.append(w)
    return out
