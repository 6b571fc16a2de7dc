"""Per-flavour facts: where the weights usually live and how the flavour is trained and sampled.

Flavours are data. Code asks a :class:`FlavourSpec` for a fact; it never branches on a flavour name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .tiny import TINY_SIZES


@dataclass(frozen=True)
class FlavourSpec:
    """Facts about one Flux flavour.

    Attributes:
        name: the ``model=`` choice.
        source: usual hub id (or ``tiny://`` for the locally built tiny model).
        guidance_embeds: the transformer takes an embedded guidance value (distilled dev family).
        t5_max_length: T5 token length used for caching text embeddings.
        guidance_value: training guidance fed to the guidance embedder (1.0 keeps distillation).
        validation_steps: sampler steps for validation images.
        validation_guidance: embedded guidance at validation.
        validation_guidance_real: > 1 turns on true CFG at validation (de-distilled flavours).
        attention_masked: pass the T5 padding mask to attention (libreflux). A flavour that needs it
            cannot turn it off.
        fast_schedule: sigma schedule is schnell's fast one (other schedules need
            ``timesteps.force_schedule=true``).
        gated: the hub repo needs an accepted license and a token.
        validation_pipeline: the diffusers pipeline class that renders validation images.
        clip_model: default CLIP model for the CLIP-score callback (``tiny://clip`` = built locally).
        preview_autoencoder: default tiny autoencoder for validation previews (``tiny://taef1`` =
            built locally).
        num_blocks: double-stream plus single-stream transformer blocks (FLUX.1: 19 + 38); lets
            ``tread`` block indices be checked before any weights load.
        reference_conditioning: the transformer also sees reference-image tokens (kontext): packed
            reference latents appended after the image tokens, their ids' channel 0 = 1.
        assistant_lora: default frozen LoRA stacked under the trained one (hub id or file), or None.
        assistant_lora_weight_name: file name of the assistant LoRA inside its hub repo / folder.
        mimics: for a tiny variant, the real flavour whose behaviour it copies (else None).
    """

    name: str
    source: str
    guidance_embeds: bool = True
    t5_max_length: int = 512
    guidance_value: float = 1.0
    validation_steps: int = 20
    validation_guidance: float = 3.0
    validation_guidance_real: float = 1.0
    attention_masked: bool = False
    fast_schedule: bool = False
    gated: bool = True
    validation_pipeline: str = "FluxPipeline"
    clip_model: str = "openai/clip-vit-large-patch14"
    preview_autoencoder: str = "madebyollin/taef1"
    num_blocks: int = 19 + 38
    reference_conditioning: bool = False
    assistant_lora: str | None = None
    assistant_lora_weight_name: str | None = None
    mimics: str | None = None


TINY_T5_MAX_LENGTH = 32
TINY_MAX_VALIDATION_STEPS = 8

FLAVOURS: dict[str, FlavourSpec] = {
    spec.name: spec
    for spec in (
        FlavourSpec("krea", "black-forest-labs/FLUX.1-Krea-dev", validation_guidance=4.5),
        FlavourSpec("dev", "black-forest-labs/FLUX.1-dev", validation_guidance=3.5),
        FlavourSpec(
            "schnell",
            "black-forest-labs/FLUX.1-schnell",
            guidance_embeds=False,
            t5_max_length=256,
            validation_steps=4,
            validation_guidance=0.0,
            fast_schedule=True,
            gated=False,
            # ostris' adapter that keeps schnell's few-step distillation intact under a trained LoRA
            assistant_lora="ostris/FLUX.1-schnell-training-adapter",
            assistant_lora_weight_name="pytorch_lora_weights.safetensors",
        ),
        FlavourSpec(
            "kontext",
            "black-forest-labs/FLUX.1-Kontext-dev",
            validation_guidance=2.5,
            reference_conditioning=True,
            validation_pipeline="FluxKontextPipeline",
        ),
        FlavourSpec(
            "fluxbooru",
            "terminusresearch/fluxbooru-v0.3",
            validation_steps=28,
            validation_guidance_real=4.0,
            gated=False,
        ),
        FlavourSpec(
            "libreflux",
            "jimmycarter/LibreFlux-SimpleTuner",
            guidance_embeds=False,
            validation_steps=28,
            validation_guidance=0.0,
            validation_guidance_real=4.0,
            attention_masked=True,
            gated=False,
        ),
        FlavourSpec(
            "tiny",
            "tiny://",
            t5_max_length=TINY_T5_MAX_LENGTH,
            validation_steps=TINY_MAX_VALIDATION_STEPS,
            validation_guidance=3.5,
            gated=False,
            clip_model="tiny://clip",
            preview_autoencoder="tiny://taef1",
            num_blocks=TINY_SIZES["num_layers"] + TINY_SIZES["num_single_layers"],
        ),
    )
}


def tiny_like(spec: FlavourSpec) -> FlavourSpec:
    """The tiny flavour behaving like ``spec``: same training/validation facts, tiny local weights.

    Everything that decides *how* a flavour trains (guidance embedding, attention mask, fast
    schedule, reference conditioning, true-CFG validation) is copied; what only concerns *where the
    weights live or how long things take* (source, gating, T5 length, validation step count, the
    hub-hosted assistant LoRA) stays tiny and offline.
    """
    tiny = FLAVOURS["tiny"]
    return replace(
        spec,
        name=tiny.name,
        source=tiny.source,
        t5_max_length=tiny.t5_max_length,
        validation_steps=min(spec.validation_steps, TINY_MAX_VALIDATION_STEPS),
        gated=False,
        assistant_lora=None,
        assistant_lora_weight_name=None,
        clip_model=tiny.clip_model,
        preview_autoencoder=tiny.preview_autoencoder,
        num_blocks=tiny.num_blocks,
        mimics=spec.name,
    )


def get_flavour(name: str) -> FlavourSpec:
    """Look up a flavour by its ``model.flavour`` name; unknown names list the known ones."""
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ValueError(f"model.flavour={name!r} is not a known flavour; choose one of {sorted(FLAVOURS)}") from None
