"""Checks of the values that go straight to Lightning and torch: trainer kwargs, optimizer and LR
schedule, checkpoint/validation intervals. One line per problem, naming the field and the fix.

The ``trainer`` group stays a plain dict (it is ``lightning.Trainer``'s keyword arguments, any of
which may be set); :data:`TRAINER_FIELDS` types the ones this project sets or relies on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, get_args

from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

from .optim import LRSchedulerConfig, OptimizerConfig

PRECISIONS: tuple = get_args(_PRECISION_INPUT_STR) + get_args(_PRECISION_INPUT_STR_ALIAS) + get_args(_PRECISION_INPUT_INT)
CLIP_ALGORITHMS = ("norm", "value")
# diffusers' get_scheduler names this config can build (piecewise_constant needs step_rules)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int, fix: str) -> Callable[[str, Any], str | None]:
    def check(name: str, v) -> str | None:
        if not _int(v) or v < low:
            return f"{name}={v!r} must be an integer >= {low}; {fix}"
        return None

    return check


def _steps_or_unlimited(name: str, v) -> str | None:
    if v is None and name.endswith("max_epochs"):
        return None
    if not _int(v) or (v < 1 and v != -1):
        return f"{name}={v!r} must be a positive integer, or -1 for no limit; e.g. {name}=1000"
    return None


def _clip_val(name: str, v) -> str | None:
    if v is not None and (not _num(v) or v < 0):
        return f"{name}={v!r} must be a number >= 0 (0 or null = no clipping); e.g. {name}=1.0"
    return None


def _clip_algorithm(name: str, v) -> str | None:
    if v is not None and v not in CLIP_ALGORITHMS:
        return f"{name}={v!r} is unknown; use norm or value"
    return None


def _precision(name: str, v) -> str | None:
    if v is not None and v not in PRECISIONS:
        return f"{name}={v!r} is not a Lightning precision; use bf16-mixed, 16-mixed, 32-true, bf16-true or null (auto)"
    return None


def _devices(name: str, v) -> str | None:
    ok = (
        v == "auto"
        or (_int(v) and (v >= 1 or v == -1))
        or (isinstance(v, (list, tuple)) and v and all(_int(i) and i >= 0 for i in v))
        or (isinstance(v, str) and all(p.strip().lstrip("-").isdigit() for p in v.split(",") if p.strip()) and v.strip())
    )
    return None if ok else f"{name}={v!r} must be a count >= 1, -1 (all), auto, or a list of device indices; e.g. {name}=1"


TRAINER_FIELDS: dict[str, Callable[[str, Any], str | None]] = {
    "max_steps": _steps_or_unlimited,
    "max_epochs": _steps_or_unlimited,
    "gradient_clip_val": _clip_val,
    "gradient_clip_algorithm": _clip_algorithm,
    "accumulate_grad_batches": _int_at_least(1, "1 = no accumulation"),
    "log_every_n_steps": _int_at_least(1, "e.g. 10"),
    "precision": _precision,
    "devices": _devices,
    "num_nodes": _int_at_least(1, "e.g. 1"),
}


def trainer_problems(trainer: Mapping | None, *, allow_endless_run: bool = False) -> list[str]:
    """Problems of the ``trainer`` kwargs (see :data:`TRAINER_FIELDS`) and the run's length."""
    trainer = trainer or {}
    out = []
    for key, check in TRAINER_FIELDS.items():
        if key in trainer:
            problem = check(f"trainer.{key}", trainer[key])
            if problem:
                out.append(problem)
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if steps == -1 and epochs in (-1, None) and not trainer.get("max_time") and not allow_endless_run:
        out.append(
            "trainer.max_steps=-1 with no trainer.max_epochs trains until killed; set trainer.max_steps=N or "
            "trainer.max_epochs=N, or allow_endless_run=true if that is what you want"
        )
    return out


def optimizer_value_problems(opt: OptimizerConfig) -> list[str]:
    """Out-of-range optimizer hyper-parameters (torch would raise a traceback at the first step)."""
    out = []
    if not _num(opt.lr) or opt.lr <= 0:
        out.append(f"optimizer.lr={opt.lr!r} must be a number > 0; e.g. optimizer.lr=1e-4")
    if opt.betas is not None and (len(opt.betas) != 2 or not all(_num(b) and 0 <= b < 1 for b in opt.betas)):
        out.append(f"optimizer.betas={list(opt.betas)} must be two numbers in [0, 1); e.g. optimizer.betas=[0.9,0.999]")
    if opt.weight_decay is not None and (not _num(opt.weight_decay) or opt.weight_decay < 0):
        out.append(f"optimizer.weight_decay={opt.weight_decay!r} must be >= 0; e.g. optimizer.weight_decay=0.01")
    if opt.eps is not None and (not _num(opt.eps) or opt.eps <= 0):
        out.append(f"optimizer.eps={opt.eps!r} must be > 0; e.g. optimizer.eps=1e-8")
    if opt.d_coef is not None and (not _num(opt.d_coef) or opt.d_coef <= 0):
        out.append(f"optimizer.d_coef={opt.d_coef!r} must be > 0; e.g. optimizer.d_coef=1.0")
    if opt.min_8bit_size is not None and opt.min_8bit_size < 0:
        out.append(f"optimizer.min_8bit_size={opt.min_8bit_size} must be >= 0; e.g. optimizer.min_8bit_size=4096")
    return out


def lr_scheduler_problems(sched: LRSchedulerConfig, max_steps) -> list[str]:
    """Unknown schedule names, warm-ups that do nothing or never end, schedules without a length."""
    if sched.name not in LR_SCHEDULERS:
        return [f"lr_scheduler.name={sched.name!r} is unknown; use one of {', '.join(LR_SCHEDULERS)}"]
    out = []
    warmup = sched.num_warmup_steps
    if warmup < 0:
        out.append(f"lr_scheduler.num_warmup_steps={warmup} must be >= 0; e.g. lr_scheduler.num_warmup_steps=100")
    elif warmup and sched.name == "constant":
        out.append(
            f"lr_scheduler.num_warmup_steps={warmup} does nothing with lr_scheduler.name=constant; "
            "use lr_scheduler=constant_with_warmup or num_warmup_steps=0"
        )
    elif _int(max_steps) and max_steps > 0 and warmup >= max_steps:
        out.append(
            f"lr_scheduler.num_warmup_steps={warmup} >= trainer.max_steps={max_steps}: the run ends during "
            "warm-up; lower num_warmup_steps"
        )
    if sched.name not in ("constant", "constant_with_warmup") and not (_int(max_steps) and max_steps > 0):
        out.append(
            f"lr_scheduler={sched.name} decays over trainer.max_steps, which is {max_steps}; set "
            "trainer.max_steps=N or use lr_scheduler=constant"
        )
    if sched.num_cycles is not None and sched.num_cycles < 1:
        out.append(f"lr_scheduler.num_cycles={sched.num_cycles} must be >= 1; e.g. lr_scheduler.num_cycles=1")
    if sched.power is not None and (not _num(sched.power) or sched.power <= 0):
        out.append(f"lr_scheduler.power={sched.power!r} must be > 0; e.g. lr_scheduler.power=1.0")
    return out


def callback_interval_problems(callbacks: Mapping | None) -> list[str]:
    """Checkpoint and evaluation intervals (``callbacks.*``)."""
    callbacks = callbacks or {}
    out = []
    ckpt = callbacks.get("model_checkpoint") or {}
    every = ckpt.get("every_n_train_steps")
    if every is not None and (not _int(every) or every < 0):
        out.append(
            f"callbacks.model_checkpoint.every_n_train_steps={every!r} must be an integer >= 0 (0 = only at "
            "the end); e.g. 500"
        )
    top_k = ckpt.get("save_top_k", 1)
    if not _int(top_k) or top_k < -1:
        out.append(f"callbacks.model_checkpoint.save_top_k={top_k!r} must be an integer >= -1 (-1 = keep all); e.g. 5")
    for name in ("validation", "eval_loss"):
        node = callbacks.get(name) or {}
        if "every_n_steps" in node:
            v = node["every_n_steps"]
            if not _int(v) or v < 0:
                out.append(f"callbacks.{name}.every_n_steps={v!r} must be an integer >= 0 (0 = baseline and final only); e.g. 100")
    return out


def nonfinite_problems(value) -> list[str]:
    if not _int(value) or value < 1:
        return [f"nonfinite_max_consecutive={value!r} must be an integer >= 1; e.g. nonfinite_max_consecutive=10"]
    return []
