"""Checks of the plain values that go straight to Lightning: trainer kwargs, Lightning's own
callbacks (by class, :data:`TARGET_CHECKS`), the non-finite guard's limit. One
:class:`~flux_lightning.errors.Problem` each, naming the field and the fix.

The ``trainer`` group stays a plain dict (it is ``lightning.Trainer``'s keyword arguments, any of
which may be set); :data:`TRAINER_FIELDS` types the ones this project sets or relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, get_args

from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
from lightning.pytorch.callbacks import ModelCheckpoint

from ..errors import Problem
from ..training.strategies import deepspeed_missing
from ..values import is_int as _int
from ..values import is_number as _num

PRECISIONS: tuple = (
    get_args(_PRECISION_INPUT_STR) + get_args(_PRECISION_INPUT_STR_ALIAS) + get_args(_PRECISION_INPUT_INT)
)
CLIP_ALGORITHMS = ("norm", "value")


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
        or (
            isinstance(v, str) and all(p.strip().lstrip("-").isdigit() for p in v.split(",") if p.strip()) and v.strip()
        )
    )
    return (
        None if ok else f"{name}={v!r} must be a count >= 1, -1 (all), auto, or a list of device indices; e.g. {name}=1"
    )


def _strategy(name: str, v) -> str | None:
    return deepspeed_missing(v)


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
    "strategy": _strategy,
}


def trainer_problems(trainer: Mapping | None, *, allow_endless_run: bool = False) -> list[Problem]:
    """Problems of the ``trainer`` kwargs (see :data:`TRAINER_FIELDS`) and the run's length."""
    trainer = trainer or {}
    out = []
    for key, check in TRAINER_FIELDS.items():
        if key in trainer:
            problem = check(f"trainer.{key}", trainer[key])
            if problem:
                out.append(Problem(f"trainer.{key}", problem))
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if steps == -1 and epochs in (-1, None) and not trainer.get("max_time") and not allow_endless_run:
        out.append(
            Problem(
                "trainer.max_steps",
                "trainer.max_steps=-1 with no trainer.max_epochs trains until killed; set trainer.max_steps=N or "
                "trainer.max_epochs=N, or allow_endless_run=true if that is what you want",
            )
        )
    return out


def model_checkpoint_problems(node: Mapping, field: str) -> list[Problem]:
    """Lightning's ``ModelCheckpoint`` (``callbacks.model_checkpoint``): its interval and how many to keep."""
    out = []
    every = node.get("every_n_train_steps")
    if every is not None and (not _int(every) or every < 0):
        out.append(
            Problem(
                f"{field}.every_n_train_steps",
                f"{field}.every_n_train_steps={every!r} must be an integer >= 0 (0 = only at the end); e.g. 500",
            )
        )
    top_k = node.get("save_top_k", 1)
    if not _int(top_k) or top_k < -1:
        out.append(
            Problem(
                f"{field}.save_top_k", f"{field}.save_top_k={top_k!r} must be an integer >= -1 (-1 = keep all); e.g. 5"
            )
        )
    return out


#: checks of callbacks this library does not define, by class (``config.callback_problems`` applies
#: them to every ``callbacks.*`` node whose ``_target_`` is that class or a subclass); the library's
#: own callbacks state their problems themselves (``config_problems``)
TARGET_CHECKS: dict[type, Callable[[Mapping, str], list[Problem]]] = {ModelCheckpoint: model_checkpoint_problems}


def nonfinite_problems(value) -> list[Problem]:
    if not _int(value) or value < 1:
        return [
            Problem(
                "nonfinite_max_consecutive",
                f"nonfinite_max_consecutive={value!r} must be an integer >= 1; e.g. nonfinite_max_consecutive=10",
            )
        ]
    return []
