"""Per-flavour facts: where the weights usually live and how the flavour is trained and sampled.

Flavours are data. Code asks a :class:`FlavourSpec` for a fact; it never branches on a flavour name.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        attention_masked: pass the T5 padding mask to attention (libreflux).
        fast_schedule: sigma schedule is schnell's fast one.
        gated: the hub repo needs an accepted license and a token.
        validation_pipeline: the diffusers pipeline class that renders validation images.
        clip_model: default CLIP model for the CLIP-score callback (``tiny://clip`` = built locally).
        preview_autoencoder: default tiny autoencoder for validation previews (``tiny://taef1`` =
            built locally).
        num_blocks: double-stream plus single-stream transformer blocks (FLUX.1: 19 + 38); lets
            ``tread_config`` block indices be checked before any weights load.
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
        ),
        FlavourSpec(
            "kontext",
            "black-forest-labs/FLUX.1-Kontext-dev",
            validation_guidance=2.5,
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
            t5_max_length=32,
            validation_steps=8,
            validation_guidance=3.5,
            gated=False,
            clip_model="tiny://clip",
            preview_autoencoder="tiny://taef1",
            num_blocks=TINY_SIZES["num_layers"] + TINY_SIZES["num_single_layers"],
        ),
    )
}


def get_flavour(name: str) -> FlavourSpec:
    """Look up a flavour by its ``model.flavour`` name; unknown names list the known ones."""
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ValueError(
            f"model.flavour={name!r} is not a known flavour; choose one of {sorted(FLAVOURS)}"
        ) from None
