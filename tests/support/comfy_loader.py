"""A small stand-in for ComfyUI's LoRA loader (``comfy.sd.load_lora_for_models``), for tests.

What it emulates (facts read from ComfyUI's ``comfy/lora.py`` and ``comfy/weight_adapter/lora.py``):

* ComfyUI loads only the tensors; the safetensors metadata is never read.
* Flux keys it recognises: ``transformer.<diffusers module>`` (diffusers / SimpleTuner layout, with
  ``lora_A`` / ``lora_B``) and ``lora_unet_<BFL module, dots as underscores>`` (kohya, with
  ``lora_down`` / ``lora_up``). Diffusers' separate q, k, v (and single-block proj_mlp) are rows of
  BFL's fused ``qkv`` / ``linear1`` weights, patched at their row offsets.
* Per module ``x``: ``alpha = lora["x.alpha"]`` when that tensor exists, and the patch is
  ``W += strength * s * (up @ down)`` with ``s = alpha / down.shape[0]`` (the rank), else ``s = 1.0``.

Here the patch is applied to the diffusers modules directly (a fused BFL weight is the row-wise
concatenation of its diffusers parts, so patching the parts' rows is the same thing).
"""

from __future__ import annotations

import torch

# BFL (kohya) module -> diffusers module suffixes of its row blocks, in row order
_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}


def _kohya_targets(transformer: torch.nn.Module) -> dict[str, list[str]]:
    """``lora_unet_<BFL module>`` -> the diffusers modules whose rows it patches, in order."""
    out = {"lora_unet_final_layer_linear": ["proj_out"]}
    for i in range(len(transformer.transformer_blocks)):
        for bfl, parts in _DOUBLE.items():
            out[f"lora_unet_double_blocks_{i}_{bfl}"] = [f"transformer_blocks.{i}.{p}" for p in parts]
    for i in range(len(transformer.single_transformer_blocks)):
        for bfl, parts in _SINGLE.items():
            out[f"lora_unet_single_blocks_{i}_{bfl}"] = [f"single_transformer_blocks.{i}.{p}" for p in parts]
    return out


def comfyui_apply(
    lora: dict[str, torch.Tensor], transformer: torch.nn.Module, strength: float = 1.0
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Patch the base Linear weights of ``transformer`` with the file tensors ``lora`` as ComfyUI does.

    ``transformer`` may carry PEFT layers: their frozen ``base_layer`` weights are the base.
    Returns ``(weights, not_loaded)``: the patched weight of every patched diffusers module, and the
    file keys ComfyUI would report as "lora key not loaded".
    """
    linears = {}
    for name, module in transformer.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
            linears[name] = base.weight.detach().float()
    key_map = {f"transformer.{m}": [m] for m in linears}
    key_map.update(_kohya_targets(transformer))
    patched: dict[str, torch.Tensor] = {}
    loaded: set[str] = set()
    for x, parts in key_map.items():
        for up_name, down_name in (
            (f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
            (f"{x}.lora_B.weight", f"{x}.lora_A.weight"),
        ):
            if up_name in lora:
                break
        else:
            continue
        up, down = lora[up_name].float(), lora[down_name].float()
        loaded |= {up_name, down_name}
        scale = 1.0
        if f"{x}.alpha" in lora:
            scale = lora[f"{x}.alpha"].item() / down.shape[0]
            loaded.add(f"{x}.alpha")
        diff = strength * scale * (up @ down)
        row = 0
        for m in parts:
            width = linears[m].shape[0]
            patched[m] = patched.get(m, linears[m]).clone() + diff[row : row + width]
            row += width
        assert row == diff.shape[0], f"{x}: {diff.shape[0]} rows for modules of {row} rows"
    return patched, set(lora) - loaded


def effective_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``W + (alpha / r) B A`` of every module carrying the trained PEFT adapter ``default``."""
    from peft.tuners.lora import LoraLayer

    return {
        name: (m.base_layer.weight.detach().float() + m.get_delta_weight("default").detach().float())
        for name, m in transformer.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }
