"""Every LoRA layout, read and written: ``diffusers`` (default), ``comfyui`` and ``kohya``.

A LoRA in memory is ``diffusers module -> LoraModule(down, up, alpha)`` (``down`` ``(r, in)``, ``up``
``(out, r)``, update ``alpha / r * up @ down``). The layouts of a file:

* ``diffusers``: ``transformer.<module>.lora_{A,B}.weight``; alpha lives in the file metadata
  (diffusers' ``lora_adapter_metadata``: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else
  ``alpha = r`` as diffusers loads it. Also read: PEFT / ai-toolkit files, prefixed ``diffusion_model.``
  or ``base_model.model.``.
* ``comfyui``: the same keys plus a float ``transformer.<module>.alpha`` tensor per module, so loaders
  that ignore metadata (ComfyUI, and diffusers' own ``network_alphas`` path) keep alpha's effect.
* ``kohya``: sd-scripts names over the original BFL modules (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1``, ...; ComfyUI's twin ``diffusion_model.double_blocks.0...`` is
  read too), ``lora_down``/``lora_up`` and ``.alpha``. Modules that BFL fuses (img/txt q,k,v;
  single-block q,k,v,mlp) are written as one LoRA whose down matrix stacks the parts' ``A`` and whose
  up matrix is block-diagonal in the parts' ``B``: exactly the same update, rank = sum of the parts'
  ranks, alpha scaled so ``alpha / r`` is unchanged. Read back, the up matrix is split at the fused
  module's rows (Flux: q, k, v share a width, the single blocks' MLP is 4 x it) and each part keeps
  only the rank components it uses.

:data:`FLUX_MODULES` is the one table between diffusers and BFL names, for writing and for reading.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import LoraFileError
from .lora_checks import alpha_value

LORA_FORMATS = ("diffusers", "comfyui", "kohya")


class FluxModule(NamedTuple):
    """A Linear module of the Flux transformer (``{}``: the block index) and the kohya (BFL) module it
    is part ``part`` of ``parts`` of; ``width``: its output width in units of the fused module's
    (q, k, v: 1, the single blocks' MLP: 4)."""

    diffusers: str
    kohya: str
    part: int = 0
    parts: int = 1
    width: int = 1
    written: bool = True  # False: read from sd-scripts files, never written (the embedders, norm_out)


FLUX_MODULES: tuple[FluxModule, ...] = (
    FluxModule("transformer_blocks.{}.attn.to_q", "double_blocks_{}_img_attn_qkv", 0, 3),
    FluxModule("transformer_blocks.{}.attn.to_k", "double_blocks_{}_img_attn_qkv", 1, 3),
    FluxModule("transformer_blocks.{}.attn.to_v", "double_blocks_{}_img_attn_qkv", 2, 3),
    FluxModule("transformer_blocks.{}.attn.add_q_proj", "double_blocks_{}_txt_attn_qkv", 0, 3),
    FluxModule("transformer_blocks.{}.attn.add_k_proj", "double_blocks_{}_txt_attn_qkv", 1, 3),
    FluxModule("transformer_blocks.{}.attn.add_v_proj", "double_blocks_{}_txt_attn_qkv", 2, 3),
    FluxModule("transformer_blocks.{}.attn.to_out.0", "double_blocks_{}_img_attn_proj"),
    FluxModule("transformer_blocks.{}.attn.to_add_out", "double_blocks_{}_txt_attn_proj"),
    FluxModule("transformer_blocks.{}.ff.net.0.proj", "double_blocks_{}_img_mlp_0"),
    FluxModule("transformer_blocks.{}.ff.net.2", "double_blocks_{}_img_mlp_2"),
    FluxModule("transformer_blocks.{}.ff_context.net.0.proj", "double_blocks_{}_txt_mlp_0"),
    FluxModule("transformer_blocks.{}.ff_context.net.2", "double_blocks_{}_txt_mlp_2"),
    FluxModule("transformer_blocks.{}.norm1.linear", "double_blocks_{}_img_mod_lin"),
    FluxModule("transformer_blocks.{}.norm1_context.linear", "double_blocks_{}_txt_mod_lin"),
    FluxModule("single_transformer_blocks.{}.attn.to_q", "single_blocks_{}_linear1", 0, 4),
    FluxModule("single_transformer_blocks.{}.attn.to_k", "single_blocks_{}_linear1", 1, 4),
    FluxModule("single_transformer_blocks.{}.attn.to_v", "single_blocks_{}_linear1", 2, 4),
    FluxModule("single_transformer_blocks.{}.proj_mlp", "single_blocks_{}_linear1", 3, 4, width=4),
    FluxModule("single_transformer_blocks.{}.proj_out", "single_blocks_{}_linear2"),
    FluxModule("single_transformer_blocks.{}.norm.linear", "single_blocks_{}_modulation_lin"),
    FluxModule("proj_out", "final_layer_linear"),
    # sd-scripts trains these only on request; the kohya layout written here has never carried them
    FluxModule("norm_out.linear", "final_layer_adaLN_modulation_1", written=False),  # rows swapped, see _SWAPPED
    FluxModule("x_embedder", "img_in", written=False),
    FluxModule("context_embedder", "txt_in", written=False),
    FluxModule("time_text_embed.timestep_embedder.linear_1", "time_in_in_layer", written=False),
    FluxModule("time_text_embed.timestep_embedder.linear_2", "time_in_out_layer", written=False),
    FluxModule("time_text_embed.guidance_embedder.linear_1", "guidance_in_in_layer", written=False),
    FluxModule("time_text_embed.guidance_embedder.linear_2", "guidance_in_out_layer", written=False),
    FluxModule("time_text_embed.text_embedder.linear_1", "vector_in_in_layer", written=False),
    FluxModule("time_text_embed.text_embedder.linear_2", "vector_in_out_layer", written=False),
)
# BFL's final modulation gives (shift, scale), diffusers' norm_out.linear (scale, shift): halves swapped
_SWAPPED = {"norm_out.linear"}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


_BY_DIFFUSERS = [(_pattern(row.diffusers), row) for row in FLUX_MODULES]
_BY_KOHYA = [(_pattern(row.kohya), row) for row in FLUX_MODULES if row.part == 0]
# every Linear module of a Flux transformer with one block of each kind (blocks of a kind share names)
FLUX_LINEARS = tuple(row.diffusers.format(0) for row in FLUX_MODULES)


def _row(module: str) -> tuple[FluxModule, tuple[str, ...]] | None:
    for pattern, row in _BY_DIFFUSERS:
        m = pattern.fullmatch(module)
        if m:
            return row, m.groups()
    return None


def kohya_name(module: str) -> tuple[str, int, int]:
    """``(kohya module, part, parts)`` the kohya layout writes a diffusers module as; ValueError if none."""
    found = _row(module)
    if found is None or not found[0].written:
        raise ValueError(f"lora_format=kohya has no name for module {module!r}; export as diffusers or comfyui")
    row, groups = found
    return row.kohya.format(*groups), row.part, row.parts


def fused_parts(kohya: str) -> list[FluxModule] | None:
    """The table rows (block index filled in) of the diffusers modules a kohya module is made of, in
    order; None for a name that is no Flux module."""
    for pattern, first in _BY_KOHYA:
        m = pattern.fullmatch(kohya)
        if m:
            rows = [row for row in FLUX_MODULES if row.kohya == first.kohya]
            return [row._replace(diffusers=row.diffusers.format(*m.groups())) for row in rows]
    return None


def unknown_modules(modules) -> list[str]:
    """The modules that are no Linear layer of a Flux transformer (block indices normalised)."""
    return [m for m in modules if _row(m) is None]


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
    for row in FLUX_MODULES:
        name = row.diffusers.format(0)
        if not row.written and check_target_module_exists(config, name):
            bad.add(row.diffusers.format("N"))
    return sorted(bad)


@dataclass
class LoraModule:
    """One module's LoRA: ``down`` ``(r, in)``, ``up`` ``(out, r)``, update ``alpha / r * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float())

    def folded(self) -> LoraModule:
        """The same update with ``alpha = r`` (scale 1), alpha folded into ``up``."""
        return LoraModule(self.down, (self.up.float() * (self.alpha / self.rank)).to(self.up.dtype), float(self.rank))


# -- which layout ----------------------------------------------------------------------------------
_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
_BFL = re.compile(r"^(double_blocks|single_blocks|final_layer|img_in|txt_in|time_in|vector_in|guidance_in)[._]")
READS = (
    "diffusers/PEFT or ai-toolkit files (transformer.<module>.lora_A.weight / .lora_B.weight), ComfyUI files "
    "(the same plus .alpha) or kohya/sd-scripts files (lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha)"
)


def strip_prefix(key: str) -> str:
    """``key`` without the ``transformer.`` / ``diffusion_model.`` / ``base_model.model.`` prefix."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def file_layout(path, tensors: dict[str, torch.Tensor]) -> str:
    """``kohya`` / ``comfyui`` / ``diffusers``: the layout of a file's keys; LoraFileError if none."""
    keys = list(tensors)
    if not keys:
        raise LoraFileError(f"{path}: the file holds no tensors; pass a LoRA file ({READS})")
    text = [k for k in keys if k.startswith(("lora_te", "text_encoder"))]
    if text:
        raise LoraFileError(
            f"{path}: holds a text-encoder LoRA (e.g. {text[0]!r}); "
            "these tools handle the transformer's LoRA only: remove the text-encoder keys first"
        )
    kohya = any(k.startswith("lora_unet_") or _BFL.match(strip_prefix(k)) for k in keys)
    # kohya files may carry .diff / .diff_b / .dora_scale: refused when read unless all zero
    known = r"\.(lora_[AB]\.weight|lora_(down|up)\.weight|alpha" + (r"|diff|diff_b|dora_scale)$" if kohya else r")$")
    bad = [k for k in keys if not re.search(known, k)]
    if bad:
        hint = " (a LoKr/LoHa file: apply it with LyCORIS)" if any("lokr" in k or "hada" in k for k in bad) else ""
        raise LoraFileError(f"{path}: unknown LoRA format, key {bad[0]!r} is not a LoRA key{hint}; pass {READS}")
    if kohya:
        return "kohya"
    return "comfyui" if any(k.endswith(".alpha") for k in keys) else "diffusers"


# -- reading ---------------------------------------------------------------------------------------
def read_modules(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], layout: str):
    """The modules of a file's (checked) tensors in ``layout`` (:func:`file_layout`); ``path`` names it in errors."""
    if layout == "kohya":
        return _read_kohya(path, tensors)
    return read_peft(path, tensors, metadata)


def metadata_alphas(metadata: dict[str, str], modules: dict[str, int], path="the LoRA") -> dict[str, float]:
    """Alpha of each module (name -> rank) from diffusers' ``lora_adapter_metadata`` (``lora_alpha``,
    ``alpha_pattern``, ``use_rslora``), or ``alpha = r`` when the file does not say, as diffusers loads it."""
    config = {}
    if "lora_adapter_metadata" in metadata:
        try:
            raw = json.loads(metadata["lora_adapter_metadata"])
        except (json.JSONDecodeError, RecursionError):
            raise LoraFileError(f"{path}: its lora_adapter_metadata is not JSON; re-export the LoRA") from None
        if not isinstance(raw, dict):
            raise LoraFileError(f"{path}: its lora_adapter_metadata is not a JSON object; re-export the LoRA")
        config = {k.removeprefix("transformer."): v for k, v in raw.items()}
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LoraFileError(
            f"{path}: lora_adapter_metadata alpha_pattern is {patterns!r}, not a mapping; re-export the LoRA"
        )
    compiled = {}
    for pattern, value in patterns.items():
        try:
            compiled[pattern] = re.compile(rf"(.*\.)?{pattern}")
        except re.error:
            raise LoraFileError(
                f"{path}: lora_adapter_metadata alpha_pattern {pattern!r} is no pattern; re-export the LoRA"
            ) from None
        alpha_value(path, f"lora_adapter_metadata alpha_pattern[{pattern!r}]", value)
    if "lora_alpha" in config:
        alpha_value(path, "lora_adapter_metadata lora_alpha", config["lora_alpha"])
    out = {}
    for name, rank in modules.items():
        alpha = config.get("lora_alpha", rank)
        for pattern, value in patterns.items():
            if compiled[pattern].fullmatch(name):
                alpha = value
        alpha = float(alpha)
        if config.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
            alpha *= math.sqrt(rank)
        out[name] = alpha
    return out


def _factors(path, tensors, suffixes) -> dict[str, dict[str, torch.Tensor]]:
    """``module -> {"down", "up", "alpha"}`` for keys ``<module><suffix>``; LoraFileError if a factor is missing."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for suffix, role in suffixes:
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[role] = value
    incomplete = [m for m, p in parts.items() if not {"down", "up"} <= p.keys()]
    if incomplete:
        raise LoraFileError(f"{path}: module {incomplete[0]!r} lacks its down or up matrix; the file is incomplete")
    return parts


def read_peft(path, tensors, metadata) -> dict[str, LoraModule]:
    """diffusers / ComfyUI / PEFT keys (prefixes stripped): alpha from ``.alpha`` tensors, else the metadata."""
    if any(k.endswith("lora_magnitude_vector") or "dora_scale" in k for k in tensors):
        raise LoraFileError(f"{path}: a DoRA file; these tools handle plain LoRA only")
    suffixes = (
        (".lora_A.weight", "down"),
        (".lora_down.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora_up.weight", "up"),
        (".alpha", "alpha"),
    )
    parts = _factors(path, {strip_prefix(k): v for k, v in tensors.items()}, suffixes)
    alphas = metadata_alphas(metadata, {m: p["down"].shape[0] for m, p in parts.items()}, path)
    return {
        m: LoraModule(p["down"], p["up"], float(p["alpha"].item()) if "alpha" in p else alphas[m])
        for m, p in sorted(parts.items())
    }


def _kohya_key(key: str) -> str:
    """``diffusion_model.single_blocks.0.linear1.lora_A.weight`` -> ``lora_unet_single_blocks_0_linear1.lora_down.weight``."""
    key = key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
    if key.startswith("lora_unet_"):
        return key
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        if key.endswith(suffix):
            return "lora_unet_" + strip_prefix(key)[: -len(suffix)].replace(".", "_") + suffix
    return key


def _read_kohya(path, tensors) -> dict[str, LoraModule]:
    extra = [k for k in tensors if k.endswith((".diff", ".diff_b", ".dora_scale"))]
    bad = next((k for k in extra if tensors[k].any()), None)
    if bad is not None:  # all-zero ones carry nothing (sd-scripts writes them for untrained modules)
        raise LoraFileError(f"{path}: holds {bad!r}, a full-weight diff or DoRA scale; these tools carry LoRA only")
    suffixes = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
    factors = _factors(path, {_kohya_key(k): v for k, v in tensors.items() if k not in extra}, suffixes)
    out: dict[str, LoraModule] = {}
    for name, p in sorted(factors.items()):
        rows = fused_parts(name.removeprefix("lora_unet_"))
        if rows is None:
            raise LoraFileError(f"{path}: {name} names no module of a Flux transformer; pass a Flux.1 LoRA")
        down, up = p["down"], p["up"]
        alpha = float(p["alpha"].item()) if "alpha" in p else float(down.shape[0])
        if rows[0].diffusers in _SWAPPED:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        units = sum(row.width for row in rows)
        if up.shape[0] % units:
            raise LoraFileError(f"{path}: {name} has {up.shape[0]} rows, not {units} x the width; not a Flux.1 LoRA")
        unit, first = up.shape[0] // units, 0
        pieces = []
        for row in rows:
            pieces.append(LoraModule(down, up[first : first + unit * row.width], alpha))
            first += unit * row.width
        if not up.any():  # untrained: every part kept, the rank shared out as it was fused (when it divides)
            share = down.shape[0] // len(rows) if down.shape[0] % len(rows) == 0 else down.shape[0]
            for j, (row, piece) in enumerate(zip(rows, pieces)):
                cols = slice(j * share, (j + 1) * share) if share < down.shape[0] else slice(None)
                out[row.diffusers] = LoraModule(down[cols], piece.up[:, cols], alpha * share / down.shape[0])
            continue
        for row, piece in zip(rows, pieces):  # each part keeps only the rank components it uses
            part = _drop_zero_columns(piece)
            if part is not None:
                out[row.diffusers] = part
    return dict(sorted(out.items()))


def _drop_zero_columns(module: LoraModule) -> LoraModule | None:
    """The same update without the rank components whose ``up`` column is zero (a fused kohya module
    split into parts carries the other parts' columns as zeros); None when nothing is left."""
    keep = module.up.abs().sum(0) != 0
    if not keep.any():
        return None
    if keep.all():
        return module
    k = int(keep.sum())
    return LoraModule(module.down[keep].contiguous(), module.up[:, keep].contiguous(), module.alpha * k / module.rank)


# -- writing ---------------------------------------------------------------------------------------
def _modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in state})


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
        sources = [row.diffusers for row in fused_parts(name)]
        if len(sources) == 1:
            down = state[f"{present[0]}.lora_A.weight"]
            up = state[f"{present[0]}.lora_B.weight"]
            rank = rank0
        else:
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
    """The file tensors for ``fmt`` of an adapter's tensors keyed ``<diffusers module>.lora_A.weight`` /
    ``.lora_B.weight`` with one ``alpha``; ``out_features`` (module -> output width) is needed by kohya."""
    if fmt not in LORA_FORMATS:
        raise ValueError(f"lora_format={fmt!r} is unknown; use one of {', '.join(LORA_FORMATS)}")
    if fmt == "kohya":
        return _fuse_for_kohya(state, alpha, out_features or {})
    tensors = {f"transformer.{k}": v for k, v in state.items()}
    if fmt == "comfyui":
        for module in _modules(state):
            tensors[f"transformer.{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def _flux_widths(modules: dict[str, LoraModule]) -> dict[str, int]:
    """Output width of every part of the fused BFL modules the kohya layout writes, from the parts
    present (the table's widths: q, k, v share one, the single-block MLP is 4 x it): the first part
    present decides, a present part of another width is refused by :func:`tensors_for`."""
    widths = {m: mod.up.shape[0] for m, mod in modules.items()}
    for name in {kohya_name(m)[0] for m in modules}:
        rows = fused_parts(name)
        first = next(row for row in rows if row.diffusers in modules)
        unit = widths[first.diffusers] // first.width
        widths.update({row.diffusers: unit * row.width for row in rows})
    return widths


def tensors_for(modules: dict[str, LoraModule], layout: str, path="the LoRA") -> dict[str, torch.Tensor]:
    """The file tensors of ``modules`` in ``layout``, written by the project's own writer
    (``diffusers``: alpha folded into ``up``; ``comfyui``: an ``.alpha`` tensor per module;
    ``kohya``: fused BFL modules, parts of unequal rank or alpha folded and zero-padded to one rank)."""
    if layout not in LORA_FORMATS:
        raise LoraFileError(f"--to {layout} is unknown; use one of {', '.join(LORA_FORMATS)}")
    if layout == "diffusers":
        state = {}
        for m, mod in modules.items():
            mod = mod.folded()
            state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"] = mod.down, mod.up
        return convert(state, "diffusers", alpha=1.0)
    if layout == "comfyui":
        state = {}
        for m, mod in modules.items():
            state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"] = mod.down, mod.up
        tensors = convert(state, "comfyui", alpha=1.0)
        for m, mod in modules.items():
            tensors[f"transformer.{m}.alpha"] = torch.tensor(float(mod.alpha), dtype=torch.float32)
        return tensors
    groups: dict[str, list[str]] = {}
    for m in modules:
        try:
            groups.setdefault(kohya_name(m)[0], []).append(m)
        except ValueError:
            raise LoraFileError(
                f"{path}: the kohya layout has no key for module {m!r}; convert it --to diffusers or comfyui"
            ) from None
    widths = _flux_widths(modules)
    for m, mod in modules.items():
        if widths[m] != mod.up.shape[0]:
            raise LoraFileError(
                f"{path}: module {m!r} is {mod.up.shape[0]} wide but its fused kohya module needs {widths[m]} "
                "(Flux: q, k, v of a block share one width, the single blocks' proj_mlp is 4 x it); "
                "convert it --to diffusers or comfyui, or fix the file"
            )
    tensors = {}
    for name, members in groups.items():
        mods = [modules[m] for m in members]
        if len({mod.down.shape[1] for mod in mods}) > 1:
            detail = ", ".join(f"{m} {mod.down.shape[1]}" for m, mod in zip(members, mods))
            raise LoraFileError(
                f"{path}: the parts of kohya's {name} read inputs of different widths ({detail}); "
                "convert it --to diffusers or comfyui, or fix the file"
            )
        if len({(mod.rank, mod.alpha) for mod in mods}) > 1:  # fold, then pad to one rank
            rank = max(mod.rank for mod in mods)
            mods = [_padded(mod.folded(), rank) for mod in mods]
            mods = [LoraModule(mod.down, mod.up, float(rank)) for mod in mods]
        state = {}
        for m, mod in zip(members, mods):
            state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"] = mod.down, mod.up
        tensors.update(convert(state, "kohya", alpha=mods[0].alpha, out_features=widths))
    return tensors


def _padded(mod: LoraModule, rank: int) -> LoraModule:
    extra = rank - mod.rank
    if not extra:
        return mod
    down = torch.cat([mod.down, mod.down.new_zeros(extra, mod.down.shape[1])])
    up = torch.cat([mod.up, mod.up.new_zeros(mod.up.shape[0], extra)], dim=1)
    return LoraModule(down, up, mod.alpha * rank / mod.rank)
