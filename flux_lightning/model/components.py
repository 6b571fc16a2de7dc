"""Load Flux components (transformer, VAE, text encoders, tokenizers, scheduler) from one source.

Every flavour, the tiny one included, goes through :func:`resolve_source` and the ``load_*``
functions below; the only difference between flavours is where the diffusers-format folder is.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import ModelSourceError
from .config import ATTENTION_BACKENDS, BACKWARD_DEVICE_TYPES, ModelConfig, attention_backend_problem
from .quantization import quantize_text_encoder, quantize_transformer
from .tiny import TINY_VERSION, ensure_tiny_folder


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


# component -> the weight files diffusers / transformers look for in its folder (messages name them)
WEIGHT_COMPONENTS = {
    "transformer": "diffusion_pytorch_model*.safetensors",
    "vae": "diffusion_pytorch_model*.safetensors",
    "text_encoder": "model*.safetensors",
    "text_encoder_2": "model*.safetensors",
}
VAE_FACTOR = 8  # pixels per latent cell: buckets, latent shapes, masks and validation assume FLUX.1's VAE
LATENT_CHANNELS = 16


def _json(path: Path) -> dict | None:
    import json

    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _weights_problem(folder: Path, pattern: str) -> str | None:
    """Why ``folder`` (one component) has no complete weights: no weight file, or an index naming a
    shard that is not there (a partial download); None when they are all there."""
    if not (folder / "config.json").is_file():
        return f"{folder.name}/config.json missing"
    for index in sorted(folder.glob("*.index.json")):
        shards = set(((_json(index) or {}).get("weight_map") or {}).values())
        missing = sorted(str(s) for s in shards if not (folder / str(s)).is_file())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            return f"{folder.name}/{missing[0]}{more} missing (named by {index.name})"
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return f"{folder.name}/{pattern} missing"
    return None


def vae_problem(folder: Path, label: str) -> str | None:
    """A VAE whose config does not downsample by :data:`VAE_FACTOR` (``2 ** (len(block_out_channels) - 1)``,
    as diffusers' FluxPipeline computes it) or has other than 16 latent channels: refused before caching."""
    config = _json(folder / "config.json")
    if config is None:
        return None
    blocks = config.get("block_out_channels")
    factor = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else VAE_FACTOR
    channels = config.get("latent_channels", LATENT_CHANNELS)
    if factor != VAE_FACTOR or channels != LATENT_CHANNELS:
        return (
            f"{label}: the VAE in {folder} downsamples by {factor} with {channels} latent channels "
            f"(config.json block_out_channels, latent_channels); Flux LoRAs train on FLUX.1's VAE (by "
            f"{VAE_FACTOR}, {LATENT_CHANNELS} channels): use a FLUX.1 folder or set "
            "model.pretrained_vae_model_name_or_path to a FLUX.1 VAE"
        )
    return None


def folder_problems(
    source: str, skip: tuple[str, ...] = (), label: str = "model.pretrained_model_name_or_path"
) -> list[str]:
    """A local diffusers pipeline folder's components that cannot load, checked without loading: each
    weight component ``model_index.json`` lists (but those in ``skip``, loaded from elsewhere) has its
    config and complete weight files, and the VAE downsamples by 8."""
    path = Path(os.path.expanduser(source))
    index = _json(path / "model_index.json")
    if index is None:
        return []
    out = []
    for name, pattern in WEIGHT_COMPONENTS.items():
        if name in skip or not isinstance(index.get(name), list) or index[name][0] is None:
            continue
        problem = _weights_problem(path / name, pattern)
        if problem is not None:
            out.append(
                f"{label}: {problem} in {path} (a partial download?); download the folder again "
                "or point the option at a complete one"
            )
        elif name == "vae":
            out += [p for p in [vae_problem(path / "vae", label)] if p]
    return out


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
        source, subfolder = (
            cfg.pretrained_transformer_model_name_or_path,
            _subfolder(cfg.pretrained_transformer_subfolder),
        )
        revision = None
    else:
        source, subfolder, revision = resolve_source(cfg), "transformer", cfg.revision
    model = FluxTransformer2DModel.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype, revision=revision)
    model.requires_grad_(False)
    quantize_transformer(model, cfg.quantization, compute_dtype=dtype)
    set_attention_backend(model, cfg.attention_backend)
    return model


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
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, revision=rev),
        tokenizer_2=T5TokenizerFast.from_pretrained(source, subfolder="tokenizer_2", revision=rev),
        text_encoder_2=T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype, revision=rev),
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
