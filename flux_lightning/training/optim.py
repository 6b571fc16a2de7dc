"""Optimizers for the adapter parameters (``optimizer=`` group), as data plus one builder.

The ``optimizer`` config node is an :class:`OptimizerConfig` (its ``_target_`` is
:func:`build_optimizer`, ``_partial_: true``); each ``conf/optimizer/<name>.yaml`` states only what
differs from it (``name`` and the keyword arguments whose library default it changes). The module
calls the partial with the adapter parameters only. LR schedulers are diffusers' ``get_scheduler``
through :func:`build_lr_scheduler` (:class:`LRSchedulerConfig`, ``conf/lr_scheduler``).

``adamw_bf16`` holds the adapter weights in bf16 and lets torch-optimi apply Kahan-compensated
updates: the rounding error of each ``p <- p + u`` in bf16 is kept in a bf16 buffer ``c`` and added
back on the next step (``y = u + c; p' = p + y; c = y - (p' - p)``), which recovers most of fp32's
accuracy at half the memory.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import Problem
from ..values import is_number

log = logging.getLogger(__name__)

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # torch's fused optimizer kernels

# diffusers' get_scheduler names this config can build (piecewise_constant needs step_rules)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class OptimizerConfig:
    """The ``optimizer`` node: which optimizer and its keyword arguments (adapter parameters only).

    A keyword left ``None`` is not passed, so the optimizer's own default applies.

    Attributes:
        name: a key of :data:`OPTIMIZERS` (``optimizer=<name>`` picks the option that sets it).
        lr: learning rate (the quickstart's LoRA default 1e-4; Prodigy wants 1.0).
        betas, weight_decay, eps: as in AdamW.
        kahan_sum: torch-optimi's Kahan-compensated updates (null = on for bf16 weights).
        min_8bit_size: bitsandbytes: tensors smaller than this keep 32-bit state.
        d_coef, use_bias_correction, safeguard_warmup: Prodigy's.
        fused: torch's AdamW (``optimizer=adamw``) in one fused kernel per step; null = on wherever
            torch has one (CPU and CUDA tensors), false = torch's own default (a loop over the
            tensors on the CPU). Same update, several times faster for the many small LoRA tensors.
    """

    _target_: str = "flux_lightning.training.optim.build_optimizer"
    _partial_: bool = True
    name: str = "adamw_bf16"
    lr: float = 1e-4
    betas: list[float] | None = None
    weight_decay: float | None = None
    eps: float | None = None
    kahan_sum: bool | None = None
    min_8bit_size: int | None = None
    d_coef: float | None = None
    use_bias_correction: bool | None = None
    safeguard_warmup: bool | None = None
    fused: bool | None = None

    def problems(self) -> list[Problem]:
        """An unknown or missing optimizer, out-of-range hyper-parameters (torch would raise a
        traceback at the first step), one line each."""
        out = optimizer_problems(self.name)
        if not is_number(self.lr) or self.lr <= 0:
            out.append(
                Problem("optimizer.lr", f"optimizer.lr={self.lr!r} must be a number > 0; e.g. optimizer.lr=1e-4")
            )
        if self.betas is not None and (
            len(self.betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            out.append(
                Problem(
                    "optimizer.betas",
                    f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1); e.g. optimizer.betas=[0.9,0.999]",
                )
            )
        if self.weight_decay is not None and (not is_number(self.weight_decay) or self.weight_decay < 0):
            out.append(
                Problem(
                    "optimizer.weight_decay",
                    f"optimizer.weight_decay={self.weight_decay!r} must be >= 0; e.g. optimizer.weight_decay=0.01",
                )
            )
        if self.eps is not None and (not is_number(self.eps) or self.eps <= 0):
            out.append(Problem("optimizer.eps", f"optimizer.eps={self.eps!r} must be > 0; e.g. optimizer.eps=1e-8"))
        if self.d_coef is not None and (not is_number(self.d_coef) or self.d_coef <= 0):
            out.append(
                Problem("optimizer.d_coef", f"optimizer.d_coef={self.d_coef!r} must be > 0; e.g. optimizer.d_coef=1.0")
            )
        if self.fused and self.name in OPTIMIZERS and not OPTIMIZERS[self.name].fusable:
            out.append(
                Problem(
                    "optimizer.fused",
                    f"optimizer.fused applies to optimizer=adamw (torch's AdamW), not {self.name}; remove it",
                )
            )
        if self.min_8bit_size is not None and self.min_8bit_size < 0:
            out.append(
                Problem(
                    "optimizer.min_8bit_size",
                    f"optimizer.min_8bit_size={self.min_8bit_size} must be >= 0; e.g. optimizer.min_8bit_size=4096",
                )
            )
        return out


@dataclass
class LRSchedulerConfig:
    """The ``lr_scheduler`` node: diffusers' ``get_scheduler(name, ...)``; ``num_training_steps``
    comes from ``trainer.max_steps``. ``num_cycles`` (cosine_with_restarts) and ``power``
    (polynomial) left ``None`` keep diffusers' defaults."""

    _target_: str = "flux_lightning.training.optim.build_lr_scheduler"
    _partial_: bool = True
    name: str = "constant"
    num_warmup_steps: int = 0
    num_cycles: int | None = None
    power: float | None = None

    def problems(self) -> list[Problem]:
        """An unknown schedule, a warm-up that does nothing, out-of-range values (the schedule's
        length against ``trainer.max_steps`` is checked in :func:`flux_lightning.config.validation.validate`)."""
        if self.name not in LR_SCHEDULERS:
            return [
                Problem(
                    "lr_scheduler.name",
                    f"lr_scheduler.name={self.name!r} is unknown; use one of {', '.join(LR_SCHEDULERS)}",
                )
            ]
        out = []
        if self.num_warmup_steps < 0:
            out.append(
                Problem(
                    "lr_scheduler.num_warmup_steps",
                    f"lr_scheduler.num_warmup_steps={self.num_warmup_steps} must be >= 0; e.g. lr_scheduler.num_warmup_steps=100",
                )
            )
        elif self.num_warmup_steps and self.name == "constant":
            out.append(
                Problem(
                    "lr_scheduler.num_warmup_steps",
                    f"lr_scheduler.num_warmup_steps={self.num_warmup_steps} does nothing with lr_scheduler.name=constant; "
                    "use lr_scheduler=constant_with_warmup or num_warmup_steps=0",
                )
            )
        if self.num_cycles is not None and self.num_cycles < 1:
            out.append(
                Problem(
                    "lr_scheduler.num_cycles",
                    f"lr_scheduler.num_cycles={self.num_cycles} must be >= 1; e.g. lr_scheduler.num_cycles=1",
                )
            )
        if self.power is not None and (not is_number(self.power) or self.power <= 0):
            out.append(
                Problem(
                    "lr_scheduler.power", f"lr_scheduler.power={self.power!r} must be > 0; e.g. lr_scheduler.power=1.0"
                )
            )
        return out

    @property
    def decays(self) -> bool:
        """Whether the schedule needs a length (``num_training_steps``)."""
        return self.name not in ("constant", "constant_with_warmup")


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``optimizer=`` choice.

    Attributes:
        name: the config name.
        target: ``module:Class`` of the optimizer.
        adapter_dtype: dtype the adapter weights are held in (``fp32`` or ``bf16``).
        install: pip hint when the package is missing.
        paged: uses paged (unified-memory) state; CUDA only, bitsandbytes falls back elsewhere.
        fusable: a torch optimizer with a ``fused`` kernel, used unless ``optimizer.fused=false``.
        family: how it takes a learning rate: ``adamw`` (AdamW's scale), ``lion`` (sign updates:
            3-10x lower), ``prodigy`` (estimates the step size; lr scales the estimate, keep 1.0).
            The wizard's learning-rate advice is per family (``configure_plan.LR_RANGES``).
    """

    name: str
    target: str
    adapter_dtype: str = "fp32"
    install: str | None = None
    paged: bool = False
    fusable: bool = False
    family: str = "adamw"

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adamw", "torch.optim:AdamW", fusable=True),
        OptimizerSpec("adamw_bf16", "optimi:AdamW", adapter_dtype="bf16", install="pip install torch-optimi"),
        OptimizerSpec("optimi_lion", "optimi:Lion", install="pip install torch-optimi", family="lion"),
        OptimizerSpec("optimi_stableadamw", "optimi:StableAdamW", install="pip install torch-optimi"),
        OptimizerSpec("adamw8bit", "bitsandbytes.optim:AdamW8bit", install="pip install 'flux-lightning[bnb]'"),
        OptimizerSpec(
            "lion8bit_paged",
            "bitsandbytes.optim:PagedLion8bit",
            install="pip install 'flux-lightning[bnb]'",
            paged=True,
            family="lion",
        ),
        OptimizerSpec(
            "prodigy", "prodigyopt:Prodigy", install="pip install 'flux-lightning[prodigy]'", family="prodigy"
        ),
    )
}

#: optimizer families (``OptimizerSpec.family``) as people name them
OPTIMIZER_FAMILIES = {"adamw": "AdamW", "lion": "Lion", "prodigy": "Prodigy"}

ADAPTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def get_optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer.name={name!r} is unknown; use one of {sorted(OPTIMIZERS)}") from None


def optimizer_problems(name: str) -> list[Problem]:
    """Why optimizer ``name`` cannot be built here (unknown, package missing), one line each."""
    if name not in OPTIMIZERS:
        return [Problem("optimizer.name", f"optimizer.name={name!r} is unknown; use one of {sorted(OPTIMIZERS)}")]
    spec = OPTIMIZERS[name]
    if importlib.util.find_spec(spec.module.split(".")[0]) is None:
        return [Problem("optimizer", f"optimizer={name} needs the {spec.module.split('.')[0]} package; {spec.install}")]
    return []


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, **kwargs) -> torch.optim.Optimizer:
    """Instantiate optimizer ``name`` over ``params`` with ``kwargs`` (lists become tuples; ``None``
    values are left out so the optimizer's own defaults apply)."""
    spec = get_optimizer_spec(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    problems = optimizer_problems(name)
    if problems:
        raise ImportError(problems[0])
    module, _, cls = spec.target.partition(":")
    optimizer_cls = getattr(importlib.import_module(module), cls)
    # Hydra passes ListConfig for betas & co.; plain tuples keep checkpoints loadable with weights_only
    kwargs = {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in kwargs.items()}
    params = list(params)
    if spec.fusable and kwargs.get("fused") is None and "foreach" not in kwargs:
        kwargs["fused"] = bool(params) and all(
            p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES and type(p.data) is torch.Tensor
            for p in params
        )
    if module == "optimi" and kwargs.get("triton") is None and not any(_on_cuda(p) for p in params):
        kwargs["triton"] = False  # optimi may pick its Triton kernels even for CPU tensors
    if name == "prodigy" and kwargs.get("lr", 1.0) < 0.1:
        log.warning(
            "optimizer=prodigy with optimizer.lr=%s: Prodigy estimates the step size itself and "
            "expects lr ~ 1.0; set optimizer.lr=1.0 unless you mean to damp it",
            kwargs["lr"],
        )
    return optimizer_cls(params, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, num_training_steps: int, **kwargs):
    """diffusers' ``get_scheduler(name, optimizer, ...)``; ``None`` keyword values are left out."""
    from diffusers.optimization import get_scheduler

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return get_scheduler(name, optimizer, num_training_steps=num_training_steps, **kwargs)


def _on_cuda(param) -> bool:
    tensors = param["params"] if isinstance(param, dict) else [param]
    return any(t.device.type == "cuda" for t in tensors)


def adapter_dtype(name: str | None) -> str:
    """The adapter weight dtype an optimizer wants (``fp32`` for unknown or custom optimizers)."""
    return OPTIMIZERS[name].adapter_dtype if name in OPTIMIZERS else "fp32"
