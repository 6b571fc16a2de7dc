"""Reading and writing LoRA files for the tools: every layout becomes one map
``diffusers module -> LoraModule(down, up, alpha)`` (update ``alpha / r * up @ down``).

Read: our three layouts (``adapters/lora_formats.py``), sd-scripts/kohya files (``lora_unet_<BFL
module>`` with ``lora_down``/``lora_up``/``.alpha``, also ComfyUI's ``diffusion_model.<BFL module>``),
and diffusers/PEFT/ai-toolkit files (``transformer.<module>.lora_A.weight``, optionally
``diffusion_model.`` or ``base_model.model.`` prefixed, alpha from ``.alpha`` tensors, else from
diffusers' ``lora_adapter_metadata``, else ``alpha = r``). Kohya names go through diffusers' own
``_convert_kohya_flux_lora_to_diffusers``, except single-block ``linear1``: diffusers splits it at
FLUX.1's fixed widths (3072/12288), so it is split here at the file's own width (Flux's
``linear1`` rows are ``3 * inner`` for q, k, v plus ``4 * inner`` for the MLP), and the final layer's
alpha, which diffusers' converter discards (``proj_out``, ``norm_out``), is folded in here first.
Written: with our own writer (:func:`flux_lightning.adapters.lora_formats.convert`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraFileError
from .lora_checks import alpha_value, check_tensors, write_safetensors
from .lora_formats import LORA_FORMATS, convert, kohya_name

_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
_BFL = re.compile(r"^(double_blocks|single_blocks|final_layer|img_in|txt_in|time_in|vector_in|guidance_in)[._]")
_READS = (
    "diffusers/PEFT or ai-toolkit files (transformer.<module>.lora_A.weight / .lora_B.weight), ComfyUI files "
    "(the same plus .alpha) or kohya/sd-scripts files (lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha)"
)


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


@dataclass
class LoraFile:
    """A LoRA file read as diffusers modules; ``layout`` is the one it was written in."""

    path: Path
    layout: str  # diffusers | comfyui | kohya
    modules: dict[str, LoraModule]
    metadata: dict[str, str]


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a ``.safetensors`` file; :class:`LoraFileError` naming it otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such LoRA file; pass the path of a .safetensors file")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFileError(
            f"{path}: not a readable .safetensors file ({err}); pass a LoRA .safetensors file"
        ) from None


def file_layout(path, tensors: dict[str, torch.Tensor]) -> str:
    """``kohya`` / ``comfyui`` / ``diffusers``: the layout of a file's keys; LoraFileError if none."""
    keys = list(tensors)
    if not keys:
        raise LoraFileError(f"{path}: the file holds no tensors; pass a LoRA file ({_READS})")
    text = [k for k in keys if k.startswith(("lora_te", "text_encoder"))]
    if text:
        raise LoraFileError(
            f"{path}: holds a text-encoder LoRA (e.g. {text[0]!r}); "
            "these tools handle the transformer's LoRA only: remove the text-encoder keys first"
        )
    kohya = any(k.startswith("lora_unet_") or _BFL.match(_strip(k)) for k in keys)
    # kohya files may carry .diff / .diff_b / .dora_scale: refused below unless all zero (diffusers drops those)
    known = r"\.(lora_[AB]\.weight|lora_(down|up)\.weight|alpha" + (r"|diff|diff_b|dora_scale)$" if kohya else r")$")
    bad = [k for k in keys if not re.search(known, k)]
    if bad:
        hint = " (a LoKr/LoHa file: apply it with LyCORIS)" if any("lokr" in k or "hada" in k for k in bad) else ""
        raise LoraFileError(f"{path}: unknown LoRA format, key {bad[0]!r} is not a LoRA key{hint}; pass {_READS}")
    if kohya:
        return "kohya"
    return "comfyui" if any(k.endswith(".alpha") for k in keys) else "diffusers"


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def read_lora(path) -> LoraFile:
    """Read any supported LoRA file as diffusers modules (see the module doc); a Lightning ``.ckpt``
    of a training run gives its adapter's LoRA (:func:`read_checkpoint`)."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return read_checkpoint(path)
    tensors, metadata = load_tensors(path)
    layout = file_layout(path, tensors)
    check_tensors(path, tensors)
    if layout == "kohya":
        modules = _read_kohya(path, tensors)
    else:
        modules = _read_peft(path, tensors, metadata)
    return LoraFile(path, layout, modules, metadata)


_CKPT_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.default\.weight")


def read_checkpoint(path) -> LoraFile:
    """The trained LoRA of a training run's Lightning checkpoint: its ``state_dict`` holds the adapter's
    tensors only (``transformer.<module>.lora_A.default.weight``), ``hyper_parameters["adapter"]`` its
    rank and alpha. Read with ``torch.load(weights_only=True)`` (no code in the file runs). A LoKr, DoRA
    or PiSSA/OLoRA/LoftQ-initialised adapter (whose LoRA is relative to a changed base) is refused."""
    from .config import BASE_MODIFYING_INITS

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such checkpoint; pass the path of a .ckpt file of a training run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 -- truncated zip, bad pickle, not a torch file, a class not allowed
        reason = " ".join(str(err).split())[:160] or "unreadable"
        raise LoraFileError(
            f"{path}: not a readable Lightning checkpoint ({type(err).__name__}: {reason}); pass a .ckpt written by "
            "a training run (checkpoints/last.ckpt) or a LoRA .safetensors file"
        ) from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    adapter = hparams.get("adapter") if isinstance(hparams, dict) else None
    if not isinstance(state, dict) or not isinstance(adapter, dict):
        raise LoraFileError(
            f"{path}: not a checkpoint of this trainer (no state_dict or hyper_parameters.adapter); pass a .ckpt "
            "written by python -m flux_lightning or a LoRA .safetensors file"
        )
    kind = adapter.get("type", "lora")
    if kind != "lora":
        raise LoraFileError(
            f"{path}: a checkpoint of adapter.type={kind}; these tools handle LoRA only (use its exported file)"
        )
    if adapter.get("use_dora"):
        raise LoraFileError(f"{path}: a DoRA checkpoint; these tools handle plain LoRA only (use its exported file)")
    if adapter.get("init") in BASE_MODIFYING_INITS:
        raise LoraFileError(
            f"{path}: a checkpoint of adapter.init={adapter['init']}, whose LoRA is relative to a changed base; "
            "use the LoRA file the run exported (lora/pytorch_lora_weights.safetensors)"
        )
    tensors = {}
    for key, value in state.items():
        found = _CKPT_KEY.fullmatch(str(key).replace("._orig_mod", ""))
        if found and isinstance(value, torch.Tensor):
            tensors[f"transformer.{found.group(1)}.lora_{found.group(2)}.weight"] = value
    if not tensors:
        raise LoraFileError(
            f"{path}: the checkpoint holds no LoRA tensors (transformer.<module>.lora_A.default.weight)"
        )
    rank = adapter.get("rank")
    alpha = adapter.get("alpha")
    alpha = alpha_value(path, "hyper_parameters.adapter.alpha", rank if alpha is None else alpha)
    metadata = {"lora_adapter_metadata": json.dumps({"lora_alpha": alpha}, default=str)}
    check_tensors(path, tensors)
    return LoraFile(path, "checkpoint", _read_peft(path, tensors, metadata), metadata)


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


def _read_peft(path, tensors, metadata) -> dict[str, LoraModule]:
    if any(k.endswith("lora_magnitude_vector") or "dora_scale" in k for k in tensors):
        raise LoraFileError(f"{path}: a DoRA file; these tools handle plain LoRA only")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = _strip(key)
        for suffix, role in (
            (".lora_A.weight", "down"),
            (".lora_down.weight", "down"),
            (".lora_B.weight", "up"),
            (".lora_up.weight", "up"),
            (".alpha", "alpha"),
        ):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[role] = value
    incomplete = [m for m, p in parts.items() if not {"down", "up"} <= p.keys()]
    if incomplete:
        raise LoraFileError(f"{path}: module {incomplete[0]!r} lacks its down or up matrix; the file is incomplete")
    alphas = metadata_alphas(metadata, {m: p["down"].shape[0] for m, p in parts.items()}, path)
    return {
        m: LoraModule(p["down"], p["up"], float(p["alpha"].item()) if "alpha" in p else alphas[m])
        for m, p in sorted(parts.items())
    }


def _kohya_name(key: str) -> str:
    """``diffusion_model.single_blocks.0.linear1.lora_A.weight`` -> ``lora_unet_single_blocks_0_linear1.lora_down.weight``."""
    key = key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
    if key.startswith("lora_unet_"):
        return key
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        if key.endswith(suffix):
            return "lora_unet_" + _strip(key)[: -len(suffix)].replace(".", "_") + suffix
    return key


def _read_kohya(path, tensors) -> dict[str, LoraModule]:
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    tensors = {_kohya_name(k): v for k, v in tensors.items()}
    extra = [k for k, v in tensors.items() if k.endswith((".diff", ".diff_b", ".dora_scale")) and v.any()]
    if extra:  # diffusers' converter would drop these with a log line
        raise LoraFileError(
            f"{path}: holds {extra[0]!r}, a full-weight diff or DoRA scale; these tools carry LoRA only"
        )
    modules: dict[str, LoraModule] = {}
    for key in [k for k in tensors if re.fullmatch(r"lora_unet_single_blocks_\d+_linear1\.lora_down\.weight", k)]:
        base = key.removesuffix(".lora_down.weight")
        down, up = tensors.pop(key), tensors.pop(f"{base}.lora_up.weight", None)
        if up is None:
            raise LoraFileError(f"{path}: {base}.lora_up.weight is missing; the file is incomplete")
        alpha = tensors.pop(f"{base}.alpha", None)
        alpha = float(alpha.item()) if alpha is not None else float(down.shape[0])
        inner = up.shape[0] // 7  # Flux: q, k, v of width inner, then the MLP of width 4 * inner
        if up.shape[0] != 7 * inner:
            raise LoraFileError(f"{path}: {base} has {up.shape[0]} rows, not 7 x the width; not a Flux.1 LoRA")
        block = base.split("_")[4]
        row = 0
        for name, width in (("attn.to_q", inner), ("attn.to_k", inner), ("attn.to_v", inner), ("proj_mlp", 4 * inner)):
            modules[f"single_transformer_blocks.{block}.{name}"] = LoraModule(down, up[row : row + width], alpha)
            row += width
    for key in [k for k in tensors if k.startswith("lora_unet_final_layer_") and k.endswith(".alpha")]:
        # diffusers' converter discards the final layer's alpha (proj_out, norm_out): fold it into up here
        base, alpha = key.removesuffix(".alpha"), tensors.pop(key).item()
        if f"{base}.lora_down.weight" in tensors and f"{base}.lora_up.weight" in tensors:
            up = tensors[f"{base}.lora_up.weight"]
            tensors[f"{base}.lora_up.weight"] = (
                up.float() * (alpha / tensors[f"{base}.lora_down.weight"].shape[0])
            ).to(up.dtype)
    try:
        converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    except (ValueError, AssertionError, KeyError) as err:
        reason = " ".join(str(err).split())[:300]
        raise LoraFileError(f"{path}: diffusers cannot read this kohya file ({reason}); pass {_READS}") from None
    modules.update(_read_peft(path, converted, {}))  # alpha folded by diffusers (scale 1)
    # a fused module (qkv, linear1) split into its parts: each part keeps only its own rank components,
    # and parts without any update are dropped (unless the whole fused module is zero, e.g. untrained)
    fused: dict[str, list[str]] = {}
    for name in modules:
        try:
            fused.setdefault(kohya_name(name)[0], []).append(name)
        except ValueError:
            fused.setdefault(name, []).append(name)
    out = {}
    for members in fused.values():
        if all(not modules[m].up.any() for m in members):
            out.update({m: modules[m] for m in members})
            continue
        for m in members:
            part = _drop_zero_columns(modules[m])
            if part is not None:
                out[m] = part
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


# -- checking names --------------------------------------------------------------------------------
def unknown_modules(modules) -> list[str]:
    """The modules that are no Linear layer of a Flux transformer (block indices normalised)."""
    from .lora_formats import _flux_linear_names

    known = set(_flux_linear_names())
    return [m for m in modules if re.sub(r"(transformer_blocks)\.\d+\.", r"\1.0.", m) not in known]


def check_flux_modules(lora: LoraFile) -> None:
    bad = unknown_modules(lora.modules)
    if bad:
        what = (
            "no layer" if len(bad) == len(lora.modules) else f"{len(bad)} of {len(lora.modules)} modules match no layer"
        )
        raise LoraFileError(
            f"{lora.path}: {what} of a Flux transformer (e.g. {bad[0]!r}); pass a Flux.1 LoRA "
            "(LoRAs of other models cannot be converted or merged here)"
        )


# -- writing ---------------------------------------------------------------------------------------
def _flux_widths(modules: dict[str, LoraModule]) -> dict[str, int]:
    """Output width of every part of the fused BFL modules the kohya layout writes, from the parts
    present (Flux facts: q, k, v share a width; the single-block MLP is 4 x that width): the first
    part's width decides, a present part of another width is refused by :func:`tensors_for`."""
    widths = {m: mod.up.shape[0] for m, mod in modules.items()}
    groups: dict[str, list[str]] = {}
    for m in modules:
        block = re.match(r"(?:single_)?transformer_blocks\.\d+", m)
        if block:
            groups.setdefault(block.group(0), []).append(m)
    for prefix, present in groups.items():
        if prefix.startswith("single_transformer_blocks"):
            inner = next((widths[m] for m in present if ".attn.to_" in m), None)
            if inner is None and f"{prefix}.proj_mlp" in widths:
                inner = widths[f"{prefix}.proj_mlp"] // 4
            if inner is not None:
                for part in ("attn.to_q", "attn.to_k", "attn.to_v"):
                    widths[f"{prefix}.{part}"] = inner
                widths[f"{prefix}.proj_mlp"] = 4 * inner
        elif prefix.startswith("transformer_blocks"):
            for trio in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
                width = next((widths[f"{prefix}.attn.{p}"] for p in trio if f"{prefix}.attn.{p}" in widths), None)
                if width is not None:
                    for p in trio:
                        widths[f"{prefix}.attn.{p}"] = width
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


def write_lora(
    modules: dict[str, LoraModule], layout: str, out, metadata: dict[str, str] | None = None, source="the LoRA"
) -> Path:
    """Write ``modules`` to the file ``out`` in ``layout`` (atomically, every tensor checked finite), with
    the layout's metadata; ``source`` names the input in errors."""
    out = Path(out)
    tensors = {k: v.contiguous() for k, v in tensors_for(modules, layout, source).items()}
    ranks = {mod.rank for mod in modules.values()}
    meta = {"format": "pt", "lora_format": layout, **(metadata or {})}
    if len(ranks) == 1 and layout == "diffusers":  # alpha folded: alpha = r
        rank = str(ranks.pop())
        meta.update(lora_rank=rank, lora_alpha=rank)
    if layout == "kohya":
        meta["ss_network_module"] = "networks.lora_flux"
    return write_safetensors(tensors, out, meta, source)
