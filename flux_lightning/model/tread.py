"""TREAD token routing: image tokens skip a span of transformer blocks during training.

TREAD (Krause et al., 2025, "TREAD: Token Routing for Efficient Architecture-agnostic Diffusion
Training") speeds up training by sending only a random subset of the image tokens through a span of
blocks. For a route ``{selection_ratio: r, start_layer_idx: a, end_layer_idx: b}``:

* blocks are numbered globally: the double-stream ``transformer_blocks`` first (``0 .. D-1``), then the
  ``single_transformer_blocks`` (``D .. D+S-1``); a negative index counts from the end (``-1`` = last);
* before block ``a`` the image tokens ``x`` ``(B, N, C)`` are split: ``K = N - floor(r N)`` tokens are
  kept (chosen at random, but every token inside the loss mask is kept), the rest wait;
* blocks ``a .. b`` (inclusive) see the text tokens and the ``K`` kept image tokens only; the rotary
  table (and an attention mask, if one is passed) is cut to the same tokens, so each kept token keeps
  its own 2-D position;
* after block ``b`` the kept tokens are written back into ``x``; the dropped tokens re-enter with
  exactly the values they had before block ``a``.

One subset is drawn per batch (diffusers' attention applies one rotary table to the whole batch), so
at the default batch size of 1 it is per sample. Routing is for training only: :class:`FluxLoRAModule`
uses it when the module is in train mode with gradients enabled, so validation, eval loss and
inference always run the full model. With no routes, :func:`routed_forward` computes exactly what
``FluxTransformer2DModel.forward`` computes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import Problem


@dataclass
class TreadRoute:
    """One routed span (quickstart ``tread.routes[i]``).

    Attributes:
        selection_ratio: fraction of the image tokens dropped inside the span, in [0, 1).
        start_layer_idx: first routed block (global index over double then single blocks; < 0 counts
            from the end).
        end_layer_idx: last routed block (inclusive), same indexing.
    """

    selection_ratio: float = 0.5
    start_layer_idx: int = 2
    end_layer_idx: int = -2


@dataclass
class TreadConfig:
    """``tread``: the routes, applied in block order; an empty list turns TREAD off."""

    routes: list[TreadRoute] = field(default_factory=list)

    def problems(self, total_blocks: int | None = None) -> list[Problem]:
        """Every invalid route, one line each naming the field and the fix.

        ``total_blocks`` (when known) checks that the indices exist; without it only what can be
        checked from the numbers alone is checked.
        """
        out: list[str] = []
        spans: list[tuple[int, int, int]] = []
        for i, route in enumerate(self.routes):
            name = f"tread.routes[{i}]"
            if not 0.0 <= route.selection_ratio < 1.0:
                out.append(
                    Problem(
                        f"{name}.selection_ratio",
                        f"{name}.selection_ratio={route.selection_ratio} must be within [0, 1) "
                        "(the fraction of image tokens dropped; 0.5 is a good start)",
                    )
                )
            if total_blocks is None:
                a, b = route.start_layer_idx, route.end_layer_idx
                if (a >= 0) == (b >= 0) and a > b:
                    out.append(
                        Problem(
                            f"{name}.start_layer_idx",
                            f"{name}: start_layer_idx={a} comes after end_layer_idx={b}; swap them",
                        )
                    )
                continue
            in_range = True
            for key in ("start_layer_idx", "end_layer_idx"):
                idx = getattr(route, key)
                if not -total_blocks <= idx < total_blocks:
                    in_range = False
                    out.append(
                        Problem(
                            f"{name}.{key}",
                            f"{name}.{key}={idx} is out of range for a transformer with {total_blocks} blocks "
                            f"(use {-total_blocks}..{total_blocks - 1}; negative counts from the end)",
                        )
                    )
            if not in_range:
                continue
            a, b = route.start_layer_idx % total_blocks, route.end_layer_idx % total_blocks
            if a > b:
                out.append(
                    Problem(
                        f"{name}.start_layer_idx",
                        f"{name}: start_layer_idx={route.start_layer_idx} (block {a}) comes after "
                        f"end_layer_idx={route.end_layer_idx} (block {b}); swap them",
                    )
                )
            else:
                spans.append((a, b, i))
        spans.sort()
        for (a1, b1, i1), (a2, b2, i2) in zip(spans, spans[1:]):
            if a2 <= b1:
                out.append(
                    Problem(
                        f"tread.routes[{i2}]",
                        f"tread.routes[{i1}] (blocks {a1}-{b1}) and routes[{i2}] (blocks {a2}-{b2}) "
                        "overlap; routes must cover disjoint block spans",
                    )
                )
        return out


def num_blocks(transformer: torch.nn.Module) -> int:
    """Double-stream plus single-stream blocks of a ``FluxTransformer2DModel``."""
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


def known_num_blocks(model) -> int | None:
    """Block count of the transformer ``model`` (a :class:`~flux_lightning.model.config.ModelConfig`)
    will load, known before loading: from a local ``config.json``, else the flavour's fact; ``None``
    when only loading can tell (a custom transformer from the hub)."""
    if model.pretrained_transformer_model_name_or_path:
        folder = Path(model.pretrained_transformer_model_name_or_path).expanduser()
        sub = model.pretrained_transformer_subfolder
        folder = folder / sub if sub not in (None, "", "none", "None") else folder
    elif model.pretrained_model_name_or_path:
        folder = Path(model.pretrained_model_name_or_path).expanduser() / "transformer"
    else:
        return model.spec.num_blocks
    config = folder / "config.json"
    if not config.is_file():
        return None if model.pretrained_transformer_model_name_or_path else model.spec.num_blocks
    values = json.loads(config.read_text())
    return int(values.get("num_layers", 19)) + int(values.get("num_single_layers", 38))


def resolve_routes(routes: Sequence[TreadRoute | Mapping], total_blocks: int) -> dict[int, tuple[int, float]]:
    """``{start_block: (end_block, selection_ratio)}`` with non-negative indices; raises on bad routes.

    Routes may be :class:`TreadRoute` objects or plain mappings with the same keys.
    """
    routes = [TreadRoute(**r) if isinstance(r, Mapping) else r for r in routes]
    problems = TreadConfig(routes).problems(total_blocks)
    if problems:
        raise ValueError("invalid TREAD routes:\n  - " + "\n  - ".join(problems))
    return {
        r.start_layer_idx % total_blocks: (r.end_layer_idx % total_blocks, float(r.selection_ratio)) for r in routes
    }


def tokens_in_mask(mask: torch.Tensor) -> torch.Tensor:
    """Packed-token view of a latent-resolution loss mask: ``(B, [1,] H, W) -> (B, H/2 * W/2)`` bool.

    A token (a 2x2 latent patch, ordered as :func:`flux_lightning.training.flow.pack_latents` orders them)
    is inside the mask when any of its four elements is > 0.
    """
    if mask.ndim == 4:
        mask = mask.amax(dim=1)
    b, h, w = mask.shape
    patches = mask.reshape(b, h // 2, 2, w // 2, 2).amax(dim=(2, 4))
    return patches.reshape(b, -1) > 0


def select_tokens(
    num_tokens: int,
    selection_ratio: float,
    *,
    keep: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Indices of the image tokens a route keeps: ``(K,)`` int64, ascending.

    ``K = num_tokens - floor(selection_ratio * num_tokens)`` tokens are drawn uniformly at random
    (from ``generator``, else the global RNG of ``device``). ``keep`` ``(N,)`` or ``(B, N)`` bool
    marks tokens that must stay (e.g. inside a loss mask; a batch keeps the union); when more are
    marked than ``K``, all marked tokens are kept and ``K`` grows to match (reading that count is
    the only host-device sync, and only happens when ``keep`` is given).
    """
    num_keep = num_tokens - int(num_tokens * selection_ratio)
    gen_device = generator.device if generator is not None else device
    scores = torch.rand(num_tokens, generator=generator, device=gen_device).to(device)
    if keep is not None:
        forced = keep.reshape(-1, num_tokens).any(dim=0).to(scores.device)
        scores = scores.masked_fill(forced, 2.0)  # above every uniform draw: chosen first
        num_keep = max(num_keep, int(forced.sum()))
    if num_keep >= num_tokens:
        return torch.arange(num_tokens, device=scores.device)
    return scores.topk(num_keep, sorted=False).indices.sort().values


def _route_inputs(
    rotary: tuple[torch.Tensor, torch.Tensor],
    attention_kwargs: dict[str, Any] | None,
    text_len: int,
    kept: torch.Tensor,
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any] | None]:
    """Cut the rotary table ``(T+N, D)`` (and an attention mask over ``T+N``) to text + kept tokens."""
    full = rotary[0].shape[0]
    index = torch.cat([torch.arange(text_len, device=kept.device), kept + text_len])
    routed_rotary = (
        rotary[0].index_select(0, index.to(rotary[0].device)),
        rotary[1].index_select(0, index.to(rotary[1].device)),
    )
    mask = (attention_kwargs or {}).get("attention_mask")
    if mask is None:
        return routed_rotary, attention_kwargs
    idx = index.to(mask.device)
    if mask.shape[-1] == full:
        mask = mask.index_select(-1, idx)
    if mask.ndim >= 3 and mask.shape[-2] == full:
        mask = mask.index_select(-2, idx)
    return routed_rotary, {**attention_kwargs, "attention_mask": mask}


def routed_forward(
    transformer: torch.nn.Module,
    routes: Sequence[TreadRoute],
    *,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    keep_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``FluxTransformer2DModel.forward`` with TREAD routes; returns the prediction ``(B, N, C_out)``.

    Arguments are those of the diffusers forward (``hidden_states`` ``(B, N, C_in)`` packed image
    tokens, ``encoder_hidden_states`` ``(B, T, C_txt)``, ``img_ids`` ``(N, 3)``, ``txt_ids``
    ``(T, 3)``, ...), plus ``keep_tokens`` ``(B, N)`` bool (image tokens never dropped, e.g.
    :func:`tokens_in_mask` of the loss mask) and ``generator`` for the token draw. Works with PEFT
    adapters, quantized layers and gradient checkpointing (each block goes through the model's own
    ``_gradient_checkpointing_func`` when checkpointing is on), like the stock forward.
    """
    t = transformer
    attention_kwargs = dict(joint_attention_kwargs) if joint_attention_kwargs else None
    if attention_kwargs and "ip_adapter_image_embeds" in attention_kwargs:
        raise ValueError("TREAD routing does not support IP-Adapter inputs; train without tread (tread.routes=[])")
    lora_scale = attention_kwargs.pop("scale", 1.0) if attention_kwargs else 1.0
    if lora_scale != 1.0:
        from diffusers.utils import scale_lora_layers, unscale_lora_layers

        scale_lora_layers(t, lora_scale)
    try:
        hidden_states = t.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
            temb = t.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = t.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = t.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
        starts = resolve_routes(routes, len(blocks)) if routes else {}
        checkpointing = torch.is_grad_enabled() and t.gradient_checkpointing
        block_rotary, block_kwargs = rotary, attention_kwargs
        end, before, kept = -1, None, None
        text_len = encoder_hidden_states.shape[1]
        for i, block in enumerate(blocks):
            if i in starts:
                end, ratio = starts[i]
                kept = select_tokens(
                    hidden_states.shape[1],
                    ratio,
                    keep=keep_tokens,
                    generator=generator,
                    device=hidden_states.device,
                )
                before = hidden_states
                hidden_states = hidden_states.index_select(1, kept)
                block_rotary, block_kwargs = _route_inputs(rotary, attention_kwargs, text_len, kept)
            if checkpointing:
                encoder_hidden_states, hidden_states = t._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, block_rotary, block_kwargs
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    image_rotary_emb=block_rotary,
                    joint_attention_kwargs=block_kwargs,
                )
            if i == end:
                if before.dtype != hidden_states.dtype:
                    before = before.to(hidden_states.dtype)
                hidden_states = before.index_copy(1, kept, hidden_states)
                block_rotary, block_kwargs = rotary, attention_kwargs
                end, before, kept = -1, None, None

        hidden_states = t.norm_out(hidden_states, temb)
        return t.proj_out(hidden_states)
    finally:
        if lora_scale != 1.0:
            unscale_lora_layers(t, lora_scale)
