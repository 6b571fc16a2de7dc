"""The "New run" form's fields, described from the config schemas (nothing is composed here).

:func:`all_fields` lists every field of the form by group (type, nullable, the schema's default, the
choices from the library's own tables, the doc line from the class docstring's
``Attributes:``/``Args:`` section); :func:`group_options` / :func:`default_options` the options of a
config group and the one the defaults list picks; :func:`experiments` the experiments on offer (built
in, and each experiment dir's). :mod:`forms` fills in the values a composition gives them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config.schema import GROUP_SCHEMAS, config_dir


# -- docs and types ---------------------------------------------------------------------------
def docstring_fields(obj, section: str = "Attributes") -> dict[str, str]:
    """``name -> text`` from the ``Attributes:`` (or ``Args:``) section of ``obj``'s docstring;
    ``a / b: text`` documents both names; continuation lines are joined."""
    doc = (obj.__doc__ or "") if not isinstance(obj, str) else obj
    lines = doc.expandtabs().splitlines()
    out: dict[str, str] = {}
    start = next((i for i, ln in enumerate(lines) if ln.strip() == f"{section}:"), None)
    if start is None:
        return out
    indent, names = None, []
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = (
            re.match(r"^([\w.]+(?:\s*[/,]\s*[\w.]+)*)\s*(?:\([^)]*\))?:\s*(.*)$", line.strip())
            if width == indent
            else None
        )
        if match:
            names = [n.strip() for n in re.split(r"[/,]", match.group(1))]
            for n in names:
                out[n] = match.group(2).strip()
        elif names:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return out


def _choices() -> dict[str, list]:
    """The known values of fields that take one of a fixed set (the library's own tables)."""
    from ..adapters.config import ADAPTER_TYPES, INIT_TYPES, LYCORIS_PRESETS, TARGET_PRESETS
    from ..config.run_checks import PRECISIONS as TRAINER_PRECISIONS
    from ..data.config import CAPTION_STRATEGIES, CROP_STYLES
    from ..model.config import ATTENTION_BACKENDS, DTYPES, GROUP_OFFLOAD_TYPES, GUIDANCE_MODES
    from ..model.flavours import FLAVOURS
    from ..model.quantization import DEFAULT_DTYPES, PRECISIONS, QUANTIZE_VIA, TEXT_ENCODER_PRECISIONS
    from ..training.flow import WEIGHTINGS
    from ..training.optim import ADAPTER_DTYPES, LR_SCHEDULERS, OPTIMIZERS

    return {
        "model.flavour": list(FLAVOURS),
        "model.tiny_like": list(FLAVOURS),
        "model.dtype": ["auto", *DTYPES],
        "model.attention_backend": list(ATTENTION_BACKENDS),
        "model.flux_guidance_mode": list(GUIDANCE_MODES),
        "model.group_offload_type": list(GROUP_OFFLOAD_TYPES),
        "model.quantization.base_model_precision": list(PRECISIONS),
        "model.quantization.quantize_via": list(QUANTIZE_VIA),
        "model.quantization.base_model_default_dtype": list(DEFAULT_DTYPES),
        "model.quantization.text_encoder_precision": list(TEXT_ENCODER_PRECISIONS),
        "adapter.type": list(ADAPTER_TYPES),
        "adapter.init": list(INIT_TYPES),
        "adapter.target": [*TARGET_PRESETS, *LYCORIS_PRESETS],
        "adapter.weight_dtype": list(ADAPTER_DTYPES),
        "dataset.caption_strategy": list(CAPTION_STRATEGIES),
        "dataset.crop_style": list(CROP_STYLES),
        "timesteps.weighting": list(WEIGHTINGS),
        "optimizer.name": list(OPTIMIZERS),
        "lr_scheduler.name": list(LR_SCHEDULERS),
        "trainer.precision": [p for p in TRAINER_PRECISIONS if isinstance(p, str)],
    }


def _kind(tp) -> tuple[str, bool]:
    """(form type, nullable) of a dataclass field annotation; ``""`` for fields a form cannot hold."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    nullable = type(None) in args
    args = [a for a in args if a is not type(None)]
    tp = args[0] if len(args) == 1 else Any
    if tp is Any:
        return "str", True  # a path or a list of paths (instance_data_dir), a preset or a list (target)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (Any,)
        return ("list", nullable) if item in (int, float, str, Any) else ("", nullable)
    if tp in (bool, int, float, str):
        return tp.__name__, nullable
    return "", nullable


# The plain-dict groups' fields on the form: (key, type, nullable); docs from the class they configure.
_TRAINER_FIELDS = [
    ("max_steps", "int", False),
    ("precision", "choice", True),
    ("accumulate_grad_batches", "int", False),
    ("gradient_clip_val", "float", True),
    ("log_every_n_steps", "int", False),
]
# where Lightning's own doc would mislead here (this project's rules differ)
_TRAINER_DOCS = {
    "max_steps": "Stop training after this number of optimizer steps. An endless run (-1, no max_epochs "
    "or max_time) needs allow_endless_run=true.",
}
_VALIDATION_FIELDS = [
    ("validation_prompt", "str", True),
    ("every_n_steps", "int", False),
    ("validation_resolution", "str", False),
    ("validation_num_inference_steps", "int", True),
    ("validation_seed", "int", False),
]
# group name -> (where its fields live in the config, the schema dataclass or None)
_TYPED_GROUPS = {
    "model": ("model", GROUP_SCHEMAS["model"]),
    "quantization": ("model.quantization", None),
    "adapter": ("adapter", GROUP_SCHEMAS["adapter"]),
    "dataset": ("dataset", GROUP_SCHEMAS["dataset"]),
    "timesteps": ("timesteps", GROUP_SCHEMAS["timesteps"]),
    "optimizer": ("optimizer", GROUP_SCHEMAS["optimizer"]),
    "lr_scheduler": ("lr_scheduler", GROUP_SCHEMAS["lr_scheduler"]),
}
GROUP_ORDER = [
    "model",
    "quantization",
    "adapter",
    "dataset",
    "timesteps",
    "optimizer",
    "lr_scheduler",
    "trainer",
    "callbacks",
    "logger",
]


def _schema_fields(prefix: str, schema, choices: dict) -> list[dict]:
    docs = docstring_fields(schema)
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        if f.name.startswith("_"):
            continue
        kind, nullable = _kind(hints[f.name])
        if not kind:
            continue
        key = f"{prefix}.{f.name}"
        if key in choices and kind == "str":
            kind = "choice"
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        out.append(
            {
                "key": key,
                "type": kind,
                "nullable": nullable,
                "default": jsonable(default),
                "doc": docs.get(f.name, ""),
                "choices": choices.get(key),
            }
        )
    return out


def jsonable(value):
    """``value`` as JSON holds it (tuples as lists, anything else unknown as its text)."""
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, (list, dict, str, int, float, bool)) or value is None:
        return value
    return str(value)


def group_options(group: str) -> list[str]:
    """The options of a config group (``<config tree>/<group>/*.yaml``), sorted."""
    folder = Path(config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def default_options() -> dict[str, str]:
    """group -> the option ``conf/train.yaml``'s defaults list picks."""
    from omegaconf import OmegaConf

    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "train.yaml"))["defaults"]:
        if isinstance(entry, dict):
            for group, option in entry.items():
                if not str(group).startswith("optional") and isinstance(option, str) and "$" not in option:
                    out[str(group)] = option
    return out


def all_fields() -> list[dict]:
    """Every field of the form, in group order, with the schema's defaults (``forms.form_spec`` adds the
    composed ones)."""
    from lightning import Trainer

    from ..callbacks.validation import ValidationImages
    from ..model.quantization import QuantizationConfig

    choices = _choices()
    fields = []
    for group, (prefix, schema) in _TYPED_GROUPS.items():
        fields += [dict(f, group=group) for f in _schema_fields(prefix, schema or QuantizationConfig, choices)]
    fields = [f for f in fields if f["key"] != "model.quantization"]
    trainer_docs = docstring_fields(Trainer.__init__, "Args")
    for name, kind, nullable in _TRAINER_FIELDS:
        key = f"trainer.{name}"
        fields.append(
            {
                "key": key,
                "type": kind,
                "nullable": nullable,
                "default": None,
                "doc": _TRAINER_DOCS.get(name) or _first_sentences(trainer_docs.get(name, "")),
                "choices": choices.get(key),
                "group": "trainer",
            }
        )
    val_docs = docstring_fields(ValidationImages, "Args")
    for name, kind, nullable in _VALIDATION_FIELDS:
        fields.append(
            {
                "key": f"callbacks.validation.{name}",
                "type": kind,
                "nullable": nullable,
                "default": None,
                "doc": val_docs.get(name, ""),
                "choices": None,
                "group": "callbacks",
            }
        )
    return fields


def _first_sentences(text: str, n: int = 2) -> str:
    """The first ``n`` sentences of a Lightning argument's doc, without its ``Default: ...`` sentence
    (any sentence naming a default: Lightning's, which this project's config may not share; the field shows the real one)."""
    parts = [p for p in re.split(r"(?<=\.)\s+", text) if not re.search(r"\bdefault", p, re.IGNORECASE)]
    return " ".join(parts[:n])


def field_index() -> dict[str, dict]:
    """key -> field spec, for every field of the form."""
    return {f["key"]: f for f in all_fields()}


# -- experiments ---------------------------------------------------------------------------------
def experiment_description(path: str | os.PathLike) -> str:
    """The opening comment of an experiment file (after ``# @package``), up to its example command."""
    lines = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.strip().startswith("@package") or not body.strip():
            continue
        if body.startswith("   "):  # the indented command lines
            break
        lines.append(body.strip())
    return " ".join(lines)


def experiments(config_dirs: Iterable[str | os.PathLike] = ()) -> list[dict]:
    """The experiments the form offers: the built-in ones, then each experiment dir's
    (``<dir>/experiment/<name>.yaml``, e.g. what ``python -m flux_lightning.wizard`` writes):
    ``[{"value", "name", "config_dir" (None: built in), "description"}]``."""
    out = []
    for name in group_options("experiment"):
        out.append(
            {
                "value": name,
                "name": name,
                "config_dir": None,
                "description": experiment_description(Path(config_dir()) / "experiment" / f"{name}.yaml"),
            }
        )
    for folder in config_dirs:
        folder = Path(folder).expanduser().resolve()
        for path in sorted((folder / "experiment").glob("*.yaml")):
            out.append(
                {
                    "value": f"{path.stem} @ {folder}",
                    "name": path.stem,
                    "config_dir": str(folder),
                    "description": experiment_description(path),
                }
            )
    return out
