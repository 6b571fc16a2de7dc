"""Load Flux components (transformer, VAE, text encoders, tokenizers, scheduler) from one source.

Every flavour, the tiny one included, goes through :func:`resolve_source` and the ``load_*``
functions below; the only difference between flavours is where the diffusers-format folder is.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from .flavours import FlavourSpec, get_flavour, tiny_like
from .quantization import DEFAULT_DTYPES, QuantizationConfig, quantize_text_encoder, quantize_transformer
from .tiny import TINY_VERSION, ensure_tiny_folder
from .errors import ModelSourceError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# model.attention_backend -> diffusers AttentionBackendName, and the package each one needs
ATTENTION_BACKENDS = {"sdpa": "native", "sageattention": "sage", "flash": "flash", "flex": "flex", "xformers": "xformers"}
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
        flavour: one of :data:`flux_lightning.flavours.FLAVOURS` (``model=<flavour>``).
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
            unquantized base. See :func:`flux_lightning.memory.apply_group_offload`.
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
            raise ValueError(
                f"model.dtype={self.dtype!r} is unknown; use auto, {', '.join(DTYPES)}"
            ) from None

    @property
    def training_guidance(self) -> float:
        return self.spec.guidance_value if self.guidance_value is None else self.guidance_value


def resolve_source(cfg: ModelConfig) -> str:
    """The main source (local folder or hub id) for ``cfg``; builds the tiny folder on demand."""
    source = cfg.pretrained_model_name_or_path or cfg.spec.source
    if source.startswith("tiny://"):
        root = os.path.expanduser(cfg.cache_dir)
        return str(ensure_tiny_folder(root, cfg.tiny_seed, guidance_embeds=cfg.spec.guidance_embeds))
    return source


def _hub_help(repo_id: str, gated: bool, reason: str) -> str:
    licence = (
        f" The repo is gated: accept its license at https://huggingface.co/{repo_id} and log in "
        "with `hf auth login` (or set the HF_TOKEN environment variable)."
        if gated
        else " If the repo is private, log in with `hf auth login` (or set HF_TOKEN)."
    )
    return (
        f"Cannot load model '{repo_id}' from the Hugging Face Hub: {reason}.{licence} "
        f"To use a local copy in diffusers format instead, pass "
        f"model.pretrained_model_name_or_path=<folder>."
    )


def check_source(source: str, *, revision: str | None = None, gated: bool = True) -> None:
    """Fail fast, before any weights load, if ``source`` is neither a usable folder nor reachable.

    A hub id is probed by fetching only its small ``model_index.json``.
    """
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model folder '{source}' has neither model_index.json nor config.json; "
                "point model.pretrained_model_name_or_path at a diffusers-format folder "
                "(one saved with FluxPipeline.save_pretrained)"
            )
        return
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelSourceError(
            f"model folder '{source}' does not exist; fix model.pretrained_model_name_or_path "
            "(a local diffusers folder or a hub id like black-forest-labs/FLUX.1-dev)"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:  # already in the local hub cache: nothing to probe
        hf_hub_download(source, "model_index.json", revision=revision, local_files_only=True)
        return
    except Exception:
        pass
    if not _hub_reachable():
        raise ModelSourceError(
            _hub_help(source, gated, "the hub is unreachable (offline) and the model is not in the local cache")
        )
    try:
        hf_hub_download(source, "model_index.json", revision=revision, etag_timeout=10)
    except GatedRepoError:
        raise ModelSourceError(_hub_help(source, True, "access to the gated repo was refused")) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(_hub_help(source, gated, "the repo was not found or is private")) from None
    except Exception as err:  # timeout, server error, ...
        reason = f"the download of model_index.json failed ({type(err).__name__})"
        raise ModelSourceError(_hub_help(source, gated, reason)) from None


def may_load(source: str, filename: str = "config.json") -> bool:
    """Whether loading ``source`` can work without waiting on an unreachable hub: a local path, a
    hub id whose ``filename`` is in the local hub cache, or a hub that answers a quick probe."""
    if Path(os.path.expanduser(source)).exists() or source.startswith((".", "/", "~")):
        return True
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, filename)
    return isinstance(cached, str) or _hub_reachable()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so an offline machine fails in seconds, not minutes."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the real request report
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _subfolder(value: str | None) -> str | None:
    return None if value in (None, "", "none", "None") else value


def load_transformer(cfg: ModelConfig, dtype: torch.dtype | None = None):
    """The frozen ``FluxTransformer2DModel`` (from the transformer override when one is given)."""
    from diffusers import FluxTransformer2DModel

    dtype = dtype or cfg.torch_dtype()
    if cfg.pretrained_transformer_model_name_or_path:
        source, subfolder = cfg.pretrained_transformer_model_name_or_path, _subfolder(
            cfg.pretrained_transformer_subfolder
        )
        revision = None
    else:
        source, subfolder, revision = resolve_source(cfg), "transformer", cfg.revision
    model = FluxTransformer2DModel.from_pretrained(
        source, subfolder=subfolder, torch_dtype=dtype, revision=revision
    )
    model.requires_grad_(False)
    quantize_transformer(model, cfg.quantization, compute_dtype=dtype)
    set_attention_backend(model, cfg.attention_backend)
    return model


def attention_backend_problem(name: str) -> str | None:
    """Why ``model.attention_backend=name`` cannot run here, or None."""
    if name not in ATTENTION_BACKENDS:
        return f"model.attention_backend={name!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}"
    package = ATTENTION_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        return (
            f"model.attention_backend={name} needs the {package} package and a CUDA GPU "
            f"(pip install {package}); or use model.attention_backend=sdpa"
        )
    return None


def training_attention_backend(name: str, device_type: str) -> str:
    """The backend training attends with on ``device_type``: ``name`` when its kernel has a backward
    pass there, else ``sdpa`` (``name`` then serves validation renders only)."""
    devices = BACKWARD_DEVICE_TYPES.get(name)
    return name if devices is None or device_type in devices else "sdpa"


def set_attention_backend(model, name: str) -> None:
    """Route the transformer's attention through ``name`` (``sdpa`` = PyTorch's, the default).

    Each attention module's processor is pinned explicitly; diffusers' model-level setter would
    also change its process-wide default backend, which would leak into every other model.
    """
    from diffusers.models.attention import AttentionModuleMixin

    problem = attention_backend_problem(name)
    if problem:
        raise RuntimeError(problem)
    for module in model.modules():
        if isinstance(module, AttentionModuleMixin) and hasattr(module.processor, "_attention_backend"):
            module.set_attention_backend(ATTENTION_BACKENDS[name])


def load_vae(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """The 16-channel ``AutoencoderKL``; its config carries ``shift_factor``/``scaling_factor``."""
    from diffusers import AutoencoderKL

    if cfg.pretrained_vae_model_name_or_path:
        source = cfg.pretrained_vae_model_name_or_path
        subfolder = "vae" if (Path(source) / "vae").is_dir() else None
    else:
        source, subfolder = resolve_source(cfg), "vae"
    vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype)
    vae.requires_grad_(False).eval()
    if cfg.vae_enable_tiling:
        vae.enable_tiling()
    return vae


def load_scheduler(cfg: ModelConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(
        resolve_source(cfg), subfolder="scheduler", revision=cfg.revision
    )


def load_text_encoders(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """CLIP-L and T5 encoders with their tokenizers, as ``FluxPipeline`` component kwargs."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    source, rev = resolve_source(cfg), cfg.revision
    parts = dict(
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=rev),
        text_encoder=CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=dtype, revision=rev
        ),
        tokenizer_2=T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2", revision=rev),
        text_encoder_2=T5EncoderModel.from_pretrained(
            source, subfolder="text_encoder_2", dtype=dtype, revision=rev
        ),
    )
    for name in ("text_encoder", "text_encoder_2"):
        parts[name].requires_grad_(False).eval()
        quantize_text_encoder(parts[name], cfg.quantization.text_encoder_precision)
    return parts


def model_identity(cfg: ModelConfig, part: str) -> str:
    """A string naming the weights behind ``part`` (``vae`` or ``text``), used in cache keys."""
    # settings that change what an encoder outputs are part of its identity (only when non-default,
    # so existing cache entries keep their keys)
    suffix = ""
    if part == "vae" and cfg.vae_enable_tiling:
        suffix = "+tiled"
    if part == "text" and cfg.quantization.text_encoder_precision != "no_change":
        suffix = f"+{cfg.quantization.text_encoder_precision}"
    if part == "vae" and cfg.pretrained_vae_model_name_or_path:
        return f"vae:{cfg.pretrained_vae_model_name_or_path}{suffix}"
    source = cfg.pretrained_model_name_or_path or cfg.spec.source
    if source.startswith("tiny://"):
        source = f"tiny://v{TINY_VERSION}-seed{cfg.tiny_seed}-guided{cfg.spec.guidance_embeds}"
    return f"{part}:{source}@{cfg.revision or 'main'}{suffix}"
