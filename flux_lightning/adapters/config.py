"""``AdapterConfig``: which adapter (LoRA or LoKr), where it goes (target presets) and how it starts.

The leaf of :mod:`flux_lightning.adapters`: standard library and torch only, so every other adapter
module (and the config validation) can import it. :meth:`AdapterConfig.problems` checks the fields
on their own; checks that need another config group (a quantized base) live in
:mod:`flux_lightning.config.validation`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import Problem

# The file every adapter is written to, LoRA or LoKr: the name diffusers' load_lora_weights looks for.
ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"

_MMDIT = ["to_q", "to_k", "to_v", "to_out.0"]
_CONTEXT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_FFS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]

TARGET_PRESETS: dict[str, list[str]] = {
    "mmdit": _MMDIT,
    "all": _MMDIT + _CONTEXT,
    "context": _CONTEXT,
    "context+ffs": _CONTEXT + ["ff_context.net.0.proj", "ff_context.net.2"],
    "all+ffs": _MMDIT + _CONTEXT + _FFS,
    "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
    "nano": ["single_transformer_blocks.7.proj_out"],
}
# LyCORIS presets (LoKr only): "attention+ff" = every Linear in the attention and feed-forward modules
LYCORIS_PRESETS = ("attention+ff",)

INIT_TYPES = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
# inits that rewrite the frozen base weights: impossible on a quantized base
BASE_MODIFYING_INITS = ("pissa", "olora", "loftq")
ADAPTER_TYPES = ("lora", "lokr")


@dataclass
class AdapterConfig:
    """Adapter hyper-parameters (``adapter=lora`` or ``adapter=lokr``).

    Attributes:
        type: ``lora`` (PEFT) or ``lokr`` (LyCORIS LoKr).
        rank: LoRA rank r; for LoKr the rank of the larger Kronecker factor (ignored with
            ``full_matrix``).
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. Null = rank (scale 1).
        dropout: dropout on the LoRA branch input during training (LoRA only).
        target: a preset name from :data:`TARGET_PRESETS` or an explicit list of module names
            (matched by suffix, as PEFT does); for LoKr also ``attention+ff`` (the quickstart's
            LyCORIS preset: every Linear in the attention and feed-forward modules).
        init: ``default`` (A Kaiming, B zero), ``gaussian``, ``pissa``, ``olora`` or ``loftq``.
            PiSSA/OLoRA move the principal part of W into the adapter; export converts back to a
            plain LoRA (rank 2r). LoftQ (CUDA + bitsandbytes) replaces W by its 4-bit NF4
            approximation Q and starts the LoRA at the best rank-r fit of W - Q: its LoRA is meant
            for an NF4 base at inference. None of these work on a quantized base.
        init_lora: continue from an existing adapter file (a LoRA in diffusers/kohya keys, or a
            LoKr exported by this library); its rank and targets must match this config.
        weight_dtype: dtype of the adapter weights, ``fp32`` or ``bf16``; null = what the optimizer
            wants (``adamw_bf16``: bf16, others fp32).
        factor: LoKr Kronecker factor (the smaller factor's side; -1 = as square as possible).
        ff_factor: LoKr factor for feed-forward modules with ``target=attention+ff``; null = factor.
        full_matrix: LoKr trains both Kronecker factors as full matrices (no low-rank split).
        use_dora: DoRA (PEFT's ``LoraConfig(use_dora=True)``, LoRA only): each targeted weight
            becomes ``m * (W + (alpha/r) B A) / ||W + (alpha/r) B A||`` (row norms), with the
            magnitude ``m`` (starting at ``||W||``) trained beside ``A`` and ``B``. Exported in the
            diffusers layout with ``lora_magnitude_vector`` tensors, which diffusers loads as DoRA.
    """

    type: str = "lora"
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.1
    target: Any = "all"
    init: str = "default"
    init_lora: str | None = None
    weight_dtype: str | None = None
    factor: int = 16
    ff_factor: int | None = 8
    full_matrix: bool = True
    use_dora: bool = False

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def problems(self) -> list[Problem]:
        """Every invalid field (or pair of fields), one line each with its fix."""
        out = []
        if self.type not in ADAPTER_TYPES:
            out.append(Problem("adapter.type", f"adapter.type={self.type!r} is unknown; use lora or lokr"))
        elif self.type == "lokr":
            out += self._lokr_problems()
        else:
            out += _target_problems(self.target)
        if self.rank < 1:
            out.append(Problem("adapter.rank", f"adapter.rank={self.rank} must be >= 1"))
        if self.init not in INIT_TYPES:
            out.append(
                Problem("adapter.init", f"adapter.init={self.init!r} is unknown; use one of {sorted(INIT_TYPES)}")
            )
        if not 0.0 <= self.dropout < 1.0:
            out.append(Problem("adapter.dropout", f"adapter.dropout={self.dropout} must be within [0, 1)"))
        if self.weight_dtype not in (None, "fp32", "bf16"):
            out.append(
                Problem(
                    "adapter.weight_dtype",
                    f"adapter.weight_dtype={self.weight_dtype!r} is unknown; use fp32, bf16 or null",
                )
            )
        if self.init == "loftq" and not torch.cuda.is_available():
            out.append(
                Problem(
                    "adapter.init",
                    "adapter.init=loftq needs a CUDA GPU and bitsandbytes (PEFT runs LoftQ's NF4 rounds on CUDA); "
                    "use adapter.init=default here",
                )
            )
        if self.use_dora:
            out += self._dora_problems()
        if self.init_lora:
            if not Path(self.init_lora).expanduser().is_file():
                out.append(
                    Problem(
                        "adapter.init_lora",
                        f"adapter.init_lora: file '{self.init_lora}' does not exist; point it at a .safetensors adapter",
                    )
                )
            if self.init != "default":
                out.append(
                    Problem(
                        "adapter.init_lora",
                        f"adapter.init_lora replaces the initial adapter weights; adapter.init={self.init} "
                        "would be discarded, use adapter.init=default",
                    )
                )
        return out

    def _dora_problems(self) -> list[Problem]:
        out = []
        if not isinstance(self.use_dora, bool):
            out.append(Problem("adapter.use_dora", f"adapter.use_dora={self.use_dora!r} must be true or false"))
        if self.type != "lora":
            out.append(
                Problem(
                    "adapter.use_dora",
                    f"adapter.use_dora=true is PEFT's DoRA of a LoRA; adapter.type={self.type} cannot take it, use adapter=lora",
                )
            )
        if self.init != "default":
            out.append(
                Problem(
                    "adapter.use_dora",
                    f"adapter.use_dora=true starts from adapter.init=default only (got adapter.init={self.init})",
                )
            )
        if self.init_lora:
            out.append(
                Problem(
                    "adapter.use_dora",
                    "adapter.use_dora=true cannot continue from adapter.init_lora (a plain LoRA file has no DoRA "
                    "magnitudes); drop adapter.init_lora or adapter.use_dora",
                )
            )
        return out

    def _lokr_problems(self) -> list[Problem]:
        out = []
        if not (isinstance(self.target, str) and self.target in LYCORIS_PRESETS):
            out += [
                Problem(p.field, f"{p} (or a LyCORIS preset: {', '.join(LYCORIS_PRESETS)})")
                for p in _target_problems(self.target)
            ]
        if self.init != "default":
            out.append(
                Problem(
                    "adapter.init",
                    f"adapter.init={self.init} is a LoRA initialisation; LoKr takes adapter.init=default",
                )
            )
        if self.factor == 0 or self.factor < -1:
            out.append(Problem("adapter.factor", f"adapter.factor={self.factor} must be -1 or a positive integer"))
        if importlib.util.find_spec("lycoris") is None:
            out.append(
                Problem("adapter", "adapter=lokr needs the lycoris-lora package; pip install 'flux-lightning[lycoris]'")
            )
        return out


def _target_problems(target: Any) -> list[Problem]:
    try:
        resolve_targets(target)
    except ValueError as err:
        return [Problem("adapter.target", str(err))]
    return []


def resolve_targets(target: Any) -> list[str]:
    """Module-name suffixes for ``adapter.target`` (a preset name or a list of names).

    Raises:
        ValueError: ``target`` is a LyCORIS preset, an unknown preset or an empty list.
    """
    if isinstance(target, str) and target in LYCORIS_PRESETS:
        raise ValueError(f"adapter.target={target!r} is a LyCORIS preset; use it with adapter=lokr")
    if isinstance(target, str):
        if target not in TARGET_PRESETS:
            raise ValueError(
                f"adapter.target={target!r} is not a preset; use one of {sorted(TARGET_PRESETS)} "
                "or a list of module names"
            )
        return list(TARGET_PRESETS[target])
    names = [str(t) for t in target]
    if not names:
        raise ValueError("adapter.target is an empty list; name at least one module")
    return names
