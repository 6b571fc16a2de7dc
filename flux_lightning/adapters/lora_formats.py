"""LoRA key layouts: ``diffusers`` (default), ``comfyui`` and ``kohya``.

Input everywhere: the adapter's tensors keyed ``<diffusers module>.lora_A.weight`` / ``.lora_B.weight``
(``A``: ``(r, in)``, ``B``: ``(out, r)``), with one ``alpha`` (update = ``alpha / r * B A``).

* ``diffusers``: ``transformer.<module>.lora_{A,B}.weight``; alpha lives in the file metadata.
* ``comfyui``: the same keys plus a float ``transformer.<module>.alpha`` tensor per module, so loaders
  that ignore metadata (ComfyUI, and diffusers' own ``network_alphas`` path) keep alpha's effect.
* ``kohya``: sd-scripts names over the original BFL modules (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1``, ...), ``lora_down``/``lora_up`` and ``.alpha``. Modules that
  BFL fuses (img/txt q,k,v; single-block q,k,v,mlp) become one LoRA whose down matrix stacks the parts'
  ``A`` and whose up matrix is block-diagonal in the parts' ``B``: exactly the same update, rank = sum
  of the parts' ranks, alpha scaled so ``alpha / r`` is unchanged.
"""

from __future__ import annotations

import functools
import re

import torch

LORA_FORMATS = ("diffusers", "comfyui", "kohya")

# diffusers module (regex) -> (kohya module, part index, number of parts) ; parts are fused in BFL
_KOHYA_RULES: list[tuple[str, str, int, int]] = [
    (r"transformer_blocks\.(\d+)\.attn\.to_q", "double_blocks_{}_img_attn_qkv", 0, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", "double_blocks_{}_img_attn_qkv", 1, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", "double_blocks_{}_img_attn_qkv", 2, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", "double_blocks_{}_txt_attn_qkv", 0, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", "double_blocks_{}_txt_attn_qkv", 1, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", "double_blocks_{}_txt_attn_qkv", 2, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks_{}_img_attn_proj", 0, 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks_{}_txt_attn_proj", 0, 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks_{}_img_mlp_0", 0, 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks_{}_img_mlp_2", 0, 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks_{}_txt_mlp_0", 0, 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks_{}_txt_mlp_2", 0, 1),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "double_blocks_{}_img_mod_lin", 0, 1),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "double_blocks_{}_txt_mod_lin", 0, 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q", "single_blocks_{}_linear1", 0, 4),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k", "single_blocks_{}_linear1", 1, 4),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v", "single_blocks_{}_linear1", 2, 4),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", "single_blocks_{}_linear1", 3, 4),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks_{}_linear2", 0, 1),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "single_blocks_{}_modulation_lin", 0, 1),
    (r"proj_out", "final_layer_linear", 0, 1),
]
_PART_SOURCES = {  # kohya fused module suffix -> diffusers module suffixes of its parts, in order
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


def _modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in state})


def kohya_name(module: str) -> tuple[str, int, int]:
    """``(kohya module, part, parts)`` for a diffusers module name; ValueError if it has none."""
    for pattern, name, part, parts in _KOHYA_RULES:
        m = re.fullmatch(pattern, module)
        if m:
            return name.format(*m.groups()), part, parts
    raise ValueError(f"lora_format=kohya has no name for module {module!r}; export as diffusers or comfyui")


@functools.lru_cache(maxsize=1)
def _flux_linear_names() -> tuple[str, ...]:
    """Every Linear module name of a Flux transformer with one double and one single block (module
    names do not depend on widths, and every block of a kind has the same names), built on the meta
    device: nothing is allocated or loaded."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
    return tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def unsupported_modules(fmt: str, targets: list[str]) -> list[str]:
    """The Flux modules (block index written ``N``) that ``targets`` select, matched by suffix as
    PEFT does, and that the layout ``fmt`` has no key for (only ``kohya`` lacks some: embedders,
    ``norm_out``, the guidance and time embedders). Known before any weights load."""
    if fmt != "kohya":
        return []
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=[re.sub(r"(transformer_blocks)\.\d+\.", r"\1.0.", t) for t in targets])
    bad = set()
    for name in _flux_linear_names():
        if check_target_module_exists(config, name):
            try:
                kohya_name(name)
            except ValueError:
                bad.add(re.sub(r"(transformer_blocks)\.0\.", r"\1.N.", name))
    return sorted(bad)


def _fuse_for_kohya(
    state: dict[str, torch.Tensor], alpha: float, out_features: dict[str, int]
) -> dict[str, torch.Tensor]:
    fused: dict[str, dict[int, str]] = {}
    for module in _modules(state):
        name, part, _ = kohya_name(module)
        fused.setdefault(name, {})[part] = module
    out = {}
    for name, parts in fused.items():
        present = [parts[p] for p in sorted(parts)]
        rank0 = state[f"{present[0]}.lora_A.weight"].shape[0]
        if any(state[f"{m}.lora_A.weight"].shape[0] != rank0 for m in present):
            raise ValueError(f"lora_format=kohya: parts of {name} have different ranks")
        suffix = next((s for s in _PART_SOURCES if name.endswith(s)), None)
        if suffix is None:
            down = state[f"{present[0]}.lora_A.weight"]
            up = state[f"{present[0]}.lora_B.weight"]
            rank = rank0
        else:
            prefix = present[0][: -len(next(s for s in _PART_SOURCES[suffix] if present[0].endswith(s)))]
            sources = [prefix + s for s in _PART_SOURCES[suffix]]
            dims = [out_features[s] for s in sources]
            downs = [state[f"{s}.lora_A.weight"] for s in sources if f"{s}.lora_A.weight" in state]
            down = torch.cat(downs, dim=0)
            rank = down.shape[0]
            up = down.new_zeros(sum(dims), rank)
            row, col = 0, 0
            for s, d in zip(sources, dims):
                if f"{s}.lora_B.weight" in state:
                    up[row : row + d, col : col + rank0] = state[f"{s}.lora_B.weight"]
                    col += rank0
                row += d
        key = f"lora_unet_{name}"
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(alpha * rank / rank0, dtype=torch.float32)
    return out


def convert(
    state: dict[str, torch.Tensor],
    fmt: str,
    *,
    alpha: float,
    out_features: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The file tensors for ``fmt``; ``out_features`` (module -> output width) is needed by kohya."""
    if fmt not in LORA_FORMATS:
        raise ValueError(f"lora_format={fmt!r} is unknown; use one of {', '.join(LORA_FORMATS)}")
    if fmt == "kohya":
        return _fuse_for_kohya(state, alpha, out_features or {})
    tensors = {f"transformer.{k}": v for k, v in state.items()}
    if fmt == "comfyui":
        for module in _modules(state):
            tensors[f"transformer.{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors
