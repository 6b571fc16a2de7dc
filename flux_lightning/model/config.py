"""``ModelConfig``: where the Flux weights come from and how the frozen base is held, and its validation.

A leaf of the configuration (flavour facts and the quantization node only); loading lives in
:mod:`flux_lightning.model.components`, memory strategies in :mod:`flux_lightning.model.memory`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

from ..errors import Problem
from .flavours import FLAVOURS, FlavourSpec, get_flavour, tiny_like
from .quantization import DEFAULT_DTYPES, QuantizationConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# model.attention_backend -> diffusers AttentionBackendName, and the package each one needs
ATTENTION_BACKENDS = {
    "sdpa": "native",
    "sageattention": "sage",
    "flash": "flash",
    "flex": "flex",
    "xformers": "xformers",
}
ATTENTION_PACKAGES = {"sageattention": "sageattention", "flash": "flash_attn", "xformers": "xformers"}
MASKED_ATTENTION_BACKENDS = ("sdpa",)  # verified to apply a padding mask (see tests)
# device types on which a backend's kernel has a backward pass, for those that lack one somewhere:
# sageattention has none (diffusers: "Backward pass is not implemented for Sage attention"), PyTorch's
# flex attention none on the CPU ("FlexAttention does not support backward on CPU"); flash-attn,
# xformers and sdpa train wherever they run
BACKWARD_DEVICE_TYPES = {"sageattention": (), "flex": ("cuda",)}
GUIDANCE_MODES = ("constant", "random-range")
GROUP_OFFLOAD_TYPES = ("block_level", "leaf_level")


@dataclass
class ModelConfig:
    """Where the Flux weights come from and how the frozen base is held.

    Attributes:
        flavour: one of :data:`flux_lightning.model.flavours.FLAVOURS` (``model=<flavour>``).
        pretrained_model_name_or_path: hub id or local diffusers folder; null = the flavour's source.
        pretrained_vae_model_name_or_path: VAE from elsewhere (its ``vae`` subfolder is used if present).
        pretrained_transformer_model_name_or_path: transformer from elsewhere (e.g. a Dev2Pro fine-tune).
        pretrained_transformer_subfolder: subfolder of that transformer source; ``none`` = the root.
        revision: hub revision for the main source.
        dtype: dtype of the frozen base: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp32``, ``fp16``.
        guidance_value: embedded guidance during training; null = the flavour's default (1.0).
        gradient_checkpointing: recompute transformer blocks in the backward pass.
        cache_dir: where the tiny flavour's folder is built.
        tiny_seed: seed of the tiny flavour's random weights.
        tiny_like: with ``flavour=tiny``, behave like this real flavour (guidance embedding, attention
            mask, fast schedule, kontext reference tokens, validation CFG), with tiny local weights.
        flux_guidance_mode: ``constant`` (every sample gets ``guidance_value``) or ``random-range``
            (each sample draws ``U(flux_guidance_min, flux_guidance_max)``).
        flux_guidance_min / flux_guidance_max: the ``random-range`` bounds.
        flux_attention_masked_training: pass the T5 padding mask to attention; null = the flavour's
            default (forced on for libreflux).
        assistant_lora_path: frozen LoRA stacked under the trained one (hub id, folder or file);
            null = the flavour's default (schnell: ostris' training adapter), ``none`` = off.
            Disabled while validation images render.
        assistant_lora_weight_name: file inside ``assistant_lora_path`` when it is a repo or folder.
        gradient_checkpointing_interval: with gradient checkpointing, checkpoint every n-th block
            only (1 = all; 2 = half of them; faster, more memory).
        attention_backend: ``sdpa`` (PyTorch), ``sageattention``, ``flash``, ``flex``, ``xformers``.
            A backend without a backward pass on the training device (sageattention anywhere, flex on
            a CPU) renders the validation images only; training attends with ``sdpa``.
        enable_group_offload: keep the frozen linear weights of the transformer blocks on the CPU
            and move one group at a time to the GPU for its forward pass (diffusers' group-offload
            hooks, in place before Lightning moves the module, so the transformer never has to fit
            on the GPU whole; validation renders the same way). The adapter, the norms and the
            modules outside the blocks stay on the GPU. CUDA only; needs gradient checkpointing of
            every block (the backward pass onloads each block again to recompute it) and an
            unquantized base. See :func:`flux_lightning.model.memory.apply_group_offload`.
        group_offload_type: ``block_level`` (a group = one block) or ``leaf_level`` (a group = one
            linear layer: least memory, most transfers).
        group_offload_blocks_per_group: must be 1 (training recomputes one block at a time).
        group_offload_use_stream: must be false (stream prefetching follows the forward order,
            which the backward pass does not).
        group_offload_to_disk_path: spill offloaded weights to this folder instead of RAM.
        enable_model_cpu_offload: models that do not train live on the CPU and visit the GPU only
            for their validation round: the validation VAE, the preview decoder and the CLIP scorer
            go back to the CPU after each round (mutually exclusive with group offload). Start-up
            needs no switch: the caching encoders (the VAE, then the text encoders) are loaded,
            used and freed before the transformer loads, and the transformer is never on the GPU
            while they encode; training reads the caches, so no encoder is loaded while it runs.
        vae_enable_tiling: decode/encode with the VAE in tiles (less memory for large images).
        quantization: how the frozen transformer (and text encoders while caching) are quantized.
    """

    flavour: str = "tiny"
    pretrained_model_name_or_path: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    pretrained_transformer_model_name_or_path: str | None = None
    pretrained_transformer_subfolder: str | None = "transformer"
    revision: str | None = None
    dtype: str = "auto"
    guidance_value: float | None = None
    gradient_checkpointing: bool = True
    cache_dir: str = "~/.cache/flux_lightning/models"
    tiny_seed: int = 0
    # -- flavour behaviour -----------------------------------------------------------------------
    tiny_like: str | None = None
    flux_guidance_mode: str = "constant"
    flux_guidance_min: float = 1.0
    flux_guidance_max: float = 4.0
    flux_attention_masked_training: bool | None = None
    assistant_lora_path: str | None = None
    assistant_lora_weight_name: str | None = None
    # -- memory ----------------------------------------------------------------------------------
    gradient_checkpointing_interval: int = 1
    attention_backend: str = "sdpa"
    enable_group_offload: bool = False
    group_offload_type: str = "block_level"
    group_offload_blocks_per_group: int = 1
    group_offload_use_stream: bool = False
    group_offload_to_disk_path: str | None = None
    enable_model_cpu_offload: bool = False
    vae_enable_tiling: bool = False
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    @property
    def spec(self) -> FlavourSpec:
        if self.tiny_like:
            return tiny_like(get_flavour(self.tiny_like))
        return get_flavour(self.flavour)

    @property
    def attention_masked(self) -> bool:
        """Whether training passes the T5 padding mask to attention."""
        if self.flux_attention_masked_training is None:
            return self.spec.attention_masked
        return self.flux_attention_masked_training or self.spec.attention_masked

    @property
    def assistant_lora(self) -> tuple[str, str | None] | None:
        """``(source, weight_name)`` of the frozen assistant LoRA, or None when there is none."""
        path = self.assistant_lora_path
        if path is None:
            path, name = self.spec.assistant_lora, self.spec.assistant_lora_weight_name
        else:
            name = self.assistant_lora_weight_name
        if path in (None, "", "none", "None"):
            return None
        return path, name

    def torch_dtype(self) -> torch.dtype:
        """Dtype of the frozen base: ``quantization.base_model_default_dtype`` when set, else ``dtype``."""
        if self.quantization.base_model_default_dtype in DEFAULT_DTYPES:
            return DEFAULT_DTYPES[self.quantization.base_model_default_dtype]
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"model.dtype={self.dtype!r} is unknown; use auto, {', '.join(DTYPES)}") from None

    @property
    def training_guidance(self) -> float:
        return self.spec.guidance_value if self.guidance_value is None else self.guidance_value

    def sample_guidance(self, batch_size: int, device=None) -> torch.Tensor | None:
        """Per-sample embedded guidance ``(B,)`` for a training step (None without a guidance embedding).

        ``constant``: every sample gets the training guidance value; ``random-range``: each draws
        ``U(flux_guidance_min, flux_guidance_max)``.
        """
        if not self.spec.guidance_embeds:
            return None
        if self.flux_guidance_mode == "random-range":
            low, high = self.flux_guidance_min, self.flux_guidance_max
            return low + (high - low) * torch.rand(batch_size, device=device)
        return torch.full((batch_size,), self.training_guidance, device=device)

    # -- validation ------------------------------------------------------------------------------
    def flavour_problems(self) -> list[Problem]:
        """An unknown ``flavour`` or ``tiny_like`` (then nothing that depends on the flavour can be checked)."""
        out: list[str] = []
        if self.flavour not in FLAVOURS:
            out.append(
                Problem("model.flavour", f"model.flavour={self.flavour!r} is unknown; use one of {sorted(FLAVOURS)}")
            )
            return out
        if self.tiny_like is not None:
            if self.flavour != "tiny":
                out.append(
                    Problem(
                        "model.tiny_like",
                        f"model.tiny_like={self.tiny_like} only applies to model.flavour=tiny; remove it",
                    )
                )
                return out
            if self.tiny_like not in FLAVOURS or self.tiny_like == "tiny":
                out.append(
                    Problem(
                        "model.tiny_like",
                        f"model.tiny_like={self.tiny_like!r} is unknown; use one of {sorted(set(FLAVOURS) - {'tiny'})}",
                    )
                )
        return out

    def problems(self, *, cuda: bool | None = None) -> list[Problem]:
        """Every invalid or impossible setting of this node (and its quantization), one line each."""
        out = self.flavour_problems()
        if out:
            return out
        spec = self.spec
        if self.dtype != "auto" and self.dtype not in DTYPES:
            out.append(Problem("model.dtype", f"model.dtype={self.dtype!r} is unknown; use auto, {', '.join(DTYPES)}"))
        if self.flux_guidance_mode not in GUIDANCE_MODES:
            out.append(
                Problem(
                    "model.flux_guidance_mode",
                    f"model.flux_guidance_mode={self.flux_guidance_mode!r} is unknown; use constant or random-range",
                )
            )
        elif self.flux_guidance_mode == "random-range":
            if not spec.guidance_embeds:
                out.append(
                    Problem(
                        "model.flux_guidance_mode",
                        f"model.flux_guidance_mode=random-range: flavour {spec.mimics or spec.name} has no guidance "
                        "embedding; use flux_guidance_mode=constant",
                    )
                )
            if self.flux_guidance_min > self.flux_guidance_max:
                out.append(
                    Problem(
                        "model.flux_guidance_min",
                        f"model.flux_guidance_min={self.flux_guidance_min} > flux_guidance_max={self.flux_guidance_max}; swap them",
                    )
                )
        if spec.attention_masked and self.flux_attention_masked_training is False:
            out.append(
                Problem(
                    "model.flux_attention_masked_training",
                    f"model.flux_attention_masked_training=false: flavour {spec.mimics or spec.name} was trained "
                    "with the T5 padding mask and needs it; remove the override",
                )
            )
        backend = attention_backend_problem(self.attention_backend)
        if backend:
            out.append(backend)
        elif self.attention_masked and self.attention_backend not in MASKED_ATTENTION_BACKENDS:
            out.append(
                Problem(
                    "model.attention_backend",
                    f"model.attention_backend={self.attention_backend} takes no attention mask, which flavour "
                    f"{spec.mimics or spec.name} / flux_attention_masked_training needs; use "
                    f"{' or '.join(MASKED_ATTENTION_BACKENDS)}",
                )
            )
        return out + self.quantization.problems() + self._memory_problems(cuda)

    def _memory_problems(self, cuda: bool | None) -> list[Problem]:
        """Invalid or impossible memory settings (gradient checkpointing, offloading)."""
        cuda = torch.cuda.is_available() if cuda is None else cuda
        out = []
        if self.gradient_checkpointing_interval < 1:
            out.append(
                Problem(
                    "model.gradient_checkpointing_interval",
                    f"model.gradient_checkpointing_interval={self.gradient_checkpointing_interval} must be >= 1; "
                    "use 1 to checkpoint every block",
                )
            )
        if self.enable_group_offload and self.enable_model_cpu_offload:
            out.append(
                Problem(
                    "model.enable_group_offload",
                    "model.enable_group_offload and model.enable_model_cpu_offload are mutually exclusive; "
                    "turn one of them off",
                )
            )
        if self.group_offload_type not in GROUP_OFFLOAD_TYPES:
            out.append(
                Problem(
                    "model.group_offload_type",
                    f"model.group_offload_type={self.group_offload_type!r} is unknown; use {' or '.join(GROUP_OFFLOAD_TYPES)}",
                )
            )
        if self.group_offload_blocks_per_group != 1:
            out.append(
                Problem(
                    "model.group_offload_blocks_per_group",
                    f"model.group_offload_blocks_per_group={self.group_offload_blocks_per_group}: the backward pass "
                    "recomputes one block at a time, so each block is its own group; use 1",
                )
            )
        if self.enable_group_offload:
            if not cuda:
                out.append(
                    Problem(
                        "model.enable_group_offload",
                        "model.enable_group_offload needs a CUDA GPU to offload from (none is visible); "
                        "set model.enable_group_offload=false",
                    )
                )
            if not self.gradient_checkpointing or self.gradient_checkpointing_interval != 1:
                out.append(
                    Problem(
                        "model.enable_group_offload",
                        "model.enable_group_offload needs model.gradient_checkpointing=true and "
                        "gradient_checkpointing_interval=1 (a block that is not recomputed keeps its onloaded "
                        "weights for the backward pass); set both",
                    )
                )
            if self.group_offload_use_stream:
                out.append(
                    Problem(
                        "model.group_offload_use_stream",
                        "model.group_offload_use_stream prefetches in forward order, which the backward pass does "
                        "not follow; set model.group_offload_use_stream=false",
                    )
                )
            if self.quantization.quantized:
                out.append(
                    Problem(
                        "model.enable_group_offload",
                        f"model.enable_group_offload moves unquantized linear weights only (quantization."
                        f"base_model_precision={self.quantization.base_model_precision}); turn one of them off",
                    )
                )
        return out


def attention_backend_problem(name: str) -> Problem | None:
    """Why ``model.attention_backend=name`` cannot run here, or None."""
    if name not in ATTENTION_BACKENDS:
        return Problem(
            "model.attention_backend",
            f"model.attention_backend={name!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}",
        )
    package = ATTENTION_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        return Problem(
            "model.attention_backend",
            f"model.attention_backend={name} needs the {package} package and a CUDA GPU "
            f"(pip install {package}); or use model.attention_backend=sdpa",
        )
    return None
