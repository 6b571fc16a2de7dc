"""The hooks the parts meet through, declared as runtime-checkable protocols (docs/architecture.md,
"How the parts meet").

``train.py`` names none of the classes it builds; a callback, the datamodule or the module takes part
in a feature by having the protocol's method, and the caller tests ``isinstance(part, Protocol)``.
Each shipped class lists the protocols it means to serve in ``implements`` (a class attribute), and
``tests/callbacks/test_hooks.py`` checks that it does and that no public method is a near miss of a hook name,
so a misspelt method fails a test instead of silently switching a feature off.

A leaf: imports only the standard library and :mod:`flux_lightning.errors`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError, Problem


# -- callbacks ------------------------------------------------------------------------------------
@runtime_checkable
class PromptTexts(Protocol):
    """Texts the part needs embedded; ``FluxDataModule.prepare_data`` asks every trainer callback,
    so no text encoder is loaded after caching (the validation prompts)."""

    def prompt_texts(self) -> list[str]: ...


@runtime_checkable
class SummaryRows(Protocol):
    """Rows of the end-of-run table and ``result.json``'s ``summary`` (module, datamodule, callbacks;
    a part that is off adds nothing)."""

    def summary_rows(self) -> list[tuple[str, object]]: ...


@runtime_checkable
class SweepMetric(Protocol):
    """``(name, value)`` a sweeper minimises, or None (``EvalLoss``: ``loss/val``); the first callback
    with a value wins, else the module's final training loss."""

    def sweep_metric(self) -> tuple[str, float] | None: ...


@runtime_checkable
class RecordsRunConfig(Protocol):
    """Takes the run's resolved config as YAML, or a callable returning it, before training
    (``ModelCard`` writes it, redacted, at the end)."""

    def set_run_config(self, config_yaml: str | Callable[[], str]) -> None: ...


@runtime_checkable
class FinishStep(Protocol):
    """The part's work at the end of an optimizer step, done early when a graceful stop writes
    ``last.ckpt`` inside that step (``GracefulStop``), so the checkpoint holds the step whole
    (``AdapterEMA``: the stopped step's update)."""

    def finish_step(self, trainer, pl_module) -> None: ...


@runtime_checkable
class ValidationWeights(Protocol):
    """A context manager that swaps other adapter weights in for a validation round, or None
    (``AdapterEMA`` with ``use_for_validation``; the live weights are restored bit for bit)."""

    def validation_weights(self, pl_module) -> AbstractContextManager | None: ...


@runtime_checkable
class ExtraExports(Protocol):
    """``(file name, weights context)`` pairs that ``AdapterExport`` writes beside the main file, in
    its format and dtype (``AdapterEMA``: ``pytorch_lora_weights_ema.safetensors``)."""

    def extra_exports(self, pl_module) -> list[tuple[str, AbstractContextManager]]: ...


@runtime_checkable
class ValidationImagesListener(Protocol):
    """Receives each validation round's images (``ValidationRecord`` list): the CLIP score."""

    def on_validation_images(self, trainer, pl_module, step: int, records) -> None: ...


# -- the datamodule -------------------------------------------------------------------------------
@runtime_checkable
class EvalSplit(Protocol):
    """A held-out split: ``EvalLoss`` finds it through ``trainer.datamodule``; ``eval_split`` says what
    was held out (or why nothing was)."""

    eval_split: str

    def eval_dataloader(self, batch_size: int | None = None): ...


# -- the module -----------------------------------------------------------------------------------
@runtime_checkable
class TrainableParameters(Protocol):
    """Name -> parameter of the trainable tensors, found once (the EMA reads it each update)."""

    def trainable_named_parameters(self) -> dict[str, Any]: ...


@runtime_checkable
class RendersImages(Protocol):
    """What ``ValidationImages`` (and the CLIP score's offload) reads from the module: the model's
    config (``model_cfg``: flavour, offload), the dtype the transformer computes in, and a context
    that sets the adapters up for rendering (assistant LoRA off, the rendering attention backend)."""

    model_cfg: Any
    compute_dtype: Any

    def inference_adapters(self, text_attention_mask=None) -> AbstractContextManager: ...


# -- configured parts -----------------------------------------------------------------------------
@runtime_checkable
class ConfigChecked(Protocol):
    """A class built from a ``_target_`` node that states its own problems: ``config_problems(args,
    field=..., run=...)`` with ``args`` its constructor's arguments (defaults filled in, see
    :func:`arguments`), ``field`` the node's dotted name (``callbacks.eval_loss``) and ``run`` the
    validated :class:`~flux_lightning.config.validation.RunConfig` (None for a part built alone). Its
    constructor raises the same problems; ``config.validate`` collects them before anything is built."""

    @classmethod
    def config_problems(cls, args: Mapping[str, Any], *, field: str, run: Any = None) -> list[Problem]: ...


#: every hook protocol (the test walks these)
HOOKS: tuple[type, ...] = (
    PromptTexts, SummaryRows, SweepMetric, RecordsRunConfig, FinishStep, ValidationWeights, ExtraExports,
    ValidationImagesListener, EvalSplit, TrainableParameters, RendersImages, ConfigChecked,
)  # fmt: skip


def arguments(cls: type, node: Mapping[str, Any]) -> dict[str, Any]:
    """``cls``'s constructor arguments as a config node gives them: the signature's defaults
    overlaid by the node's keys (Hydra's ``_target_``/``_partial_``... left out)."""
    params = inspect.signature(cls.__init__).parameters.values()
    out = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    out.update({k: v for k, v in node.items() if not str(k).startswith("_")})
    return out


def raise_problems(problems: list[Problem]) -> None:
    """Raise one :class:`~flux_lightning.errors.ConfigError` listing ``problems``, if any."""
    if problems:
        raise ConfigError(problems)
