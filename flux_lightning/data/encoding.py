"""Turn pixels into VAE latents and captions into Flux text embeddings (used only while caching)."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, 16, H/8, W/8)`` latents.

    ``z = (sample - shift_factor) * scaling_factor``: one sample of the latent distribution per
    image, drawn with that image's own seed (so an entry does not depend on its batch-mates),
    normalised with the factors from the VAE config (FLUX.1: shift 0.1159, scale 0.3611).
    """
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
    shift = vae.config.shift_factor or 0.0
    return ((z - shift) * vae.config.scaling_factor).float().cpu()


@torch.no_grad()
def encode_prompts(text_parts: dict, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Flux text conditioning for ``prompts``, exactly as ``FluxPipeline.encode_prompt`` computes it.

    Returns ``prompt_embeds`` ``(B, T, D_t5)``, ``pooled_prompt_embeds`` ``(B, D_clip)`` and the T5
    ``attention_mask`` ``(B, T)`` (for attention-masked training).
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, **text_parts)
    device = next(text_parts["text_encoder_2"].parameters()).device
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_length
    )
    mask = text_parts["tokenizer_2"](
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).attention_mask
    return {
        "prompt_embeds": prompt_embeds.float().cpu(),
        "pooled_prompt_embeds": pooled.float().cpu(),
        "attention_mask": mask.to(torch.uint8),
    }
