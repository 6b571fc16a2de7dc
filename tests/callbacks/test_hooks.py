"""The hooks the parts meet through are declared (flux_lightning/training/hooks.py): every shipped callback,
the datamodule and the module serve the protocols they list in ``implements``, with the protocol's
parameter names, and no public method is a near miss of a hook name, so a misspelt hook fails here
instead of silently switching a feature off."""

import difflib
import inspect
import typing

import lightning as L
import pytest

from flux_lightning.callbacks import (
    AdapterEMA,
    AdapterExport,
    CLIPScoreCallback,
    EvalLoss,
    LossProgressBar,
    ModelCard,
    ValidationImages,
)
from flux_lightning.data import DatasetConfig, FluxDataModule
from flux_lightning.model.config import ModelConfig
from flux_lightning.training import hooks
from flux_lightning.training.module import FluxLoRAModule
from flux_lightning.training.stopping import GracefulStop


def _members(proto) -> set[str]:
    attrs = getattr(proto, "__protocol_attrs__", None)  # Python >= 3.12
    return set(attrs) if attrs is not None else set(typing._get_protocol_attrs(proto))  # noqa: SLF001


HOOK_NAMES = {name: proto for proto in hooks.HOOKS for name in _members(proto)}
# public names that look like a hook name but are not one (each checked by hand)
NOT_HOOKS = {"trainable_parameters"}  # FluxLoRAModule: the list beside trainable_named_parameters
# Lightning's own classes define their hooks; a name they define is theirs, not ours
LIGHTNING_BASES = (L.Callback, L.LightningModule, L.LightningDataModule)


def _own_names(cls) -> set[str]:
    """Public names defined by ``cls`` and its bases below Lightning's classes."""
    theirs = {klass for base in LIGHTNING_BASES for klass in base.__mro__}
    lightning = {n for klass in theirs for n in vars(klass)}
    names = set()
    for klass in cls.__mro__:
        if klass not in theirs and not klass.__module__.startswith(("lightning", "torch")):
            names |= {n for n in vars(klass) if not n.startswith("_") and n not in lightning}
    return names


def _is_method(proto, name: str) -> bool:
    """A method (or classmethod) of the protocol; else a data member (``eval_split: str``)."""
    member = vars(proto).get(name)
    return isinstance(member, (classmethod, staticmethod)) or (callable(member) and not isinstance(member, type))


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]


def hook_problems(obj) -> list[str]:
    """What is wrong with ``obj``'s hooks: a listed protocol it does not serve (a member missing, or
    a method whose parameters differ), a hook method it has but does not list, a near miss."""
    cls = type(obj)
    declared = tuple(getattr(cls, "implements", ()))
    out = [
        f"{cls.__name__}.implements lists {p!r}, not a protocol of hooks.HOOKS"
        for p in declared
        if p not in hooks.HOOKS
    ]
    for proto in declared:
        for name in _members(proto):
            if not hasattr(cls, name) and name not in vars(obj):
                out.append(f"{cls.__name__} lists {proto.__name__} but has no {name}")
                continue
            if _is_method(proto, name):
                wanted, have = getattr(proto, name), getattr(cls, name)
                if not callable(have) or _params(have) != _params(wanted):
                    out.append(f"{cls.__name__}.{name} does not take {_params(wanted)} ({proto.__name__})")
        if all(_is_method(proto, n) for n in _members(proto)):
            if not isinstance(obj, proto):  # method-only protocols: the runtime check the callers make
                out.append(f"{cls.__name__} is no {proto.__name__}")
    for name in sorted(_own_names(cls)):
        if name in HOOK_NAMES and HOOK_NAMES[name] not in declared:
            out.append(f"{cls.__name__}.{name} is a hook of {HOOK_NAMES[name].__name__}, which it does not list")
        elif name not in HOOK_NAMES and name not in NOT_HOOKS:
            close = difflib.get_close_matches(name, HOOK_NAMES, n=1, cutoff=0.8)
            if close:
                out.append(f"{cls.__name__}.{name} looks like the hook {close[0]} misspelt")
    return out


def _shipped(tmp_path):
    return [
        AdapterEMA(),
        AdapterExport(str(tmp_path / "lora")),
        CLIPScoreCallback(),
        EvalLoss(),
        LossProgressBar(),
        ModelCard(str(tmp_path / "lora")),
        ValidationImages(str(tmp_path / "validation"), validation_prompt="a red circle"),
        GracefulStop(),
        FluxDataModule(DatasetConfig(cache_dir=str(tmp_path / "cache")), ModelConfig(flavour="tiny")),
        FluxLoRAModule(ModelConfig(flavour="tiny")),
    ]


def test_every_shipped_part_serves_the_hooks_it_lists_and_no_more(tmp_path):
    parts = _shipped(tmp_path)
    assert {type(p).__name__: hook_problems(p) for p in parts} == {type(p).__name__: [] for p in parts}
    # what each feature relies on
    assert isinstance(ValidationImages, hooks.ConfigChecked) and isinstance(parts[0], hooks.ValidationWeights)
    assert isinstance(parts[3], hooks.SweepMetric) and isinstance(parts[6], hooks.PromptTexts)
    assert isinstance(parts[8], hooks.EvalSplit) and isinstance(parts[9], hooks.TrainableParameters)


class _Misspelt(L.Callback):
    implements = (hooks.SummaryRows,)

    def summary_row(self):  # the hook is summary_rows: the end-of-run table would silently lose it
        return []


class _Unlisted(L.Callback):
    def sweep_metric(self):
        return None


class _WrongParameters(L.Callback):
    implements = (hooks.ValidationWeights,)

    def validation_weights(self):
        return None


class _Undeclared(L.Callback):
    implements = (hooks.ExtraExports,)


@pytest.mark.parametrize(
    "part,problem",
    [
        (_Misspelt(), "summary_row looks like the hook summary_rows misspelt"),
        (_Misspelt(), "lists SummaryRows but has no summary_rows"),
        (_Unlisted(), "sweep_metric is a hook of SweepMetric, which it does not list"),
        (_WrongParameters(), "validation_weights does not take ['pl_module']"),
        (_Undeclared(), "lists ExtraExports but has no extra_exports"),
    ],
)
def test_a_misspelt_unlisted_or_wrong_hook_is_found(part, problem):
    assert any(problem in p for p in hook_problems(part)), hook_problems(part)


def test_callers_ask_the_protocol_not_the_name(monkeypatch):
    """``train.summary_rows`` takes rows from every part that is a SummaryRows, and only those."""
    from types import SimpleNamespace

    from flux_lightning.run import train

    class Rows(L.Callback):
        implements = (hooks.SummaryRows,)

        def summary_rows(self):
            return [("mine", 1)]

    monkeypatch.setattr(train, "device_summary_rows", lambda trainer: [])
    trainer = SimpleNamespace(global_step=3, callbacks=[Rows(), _Misspelt()], log_dir=None)
    assert train.summary_rows(trainer, object(), object(), "out") == [
        ("run dir", "out"),
        ("steps", 3),
        ("mine", 1),
        ("logs", "off"),
    ]
