"""The "New run" form, generated from the config schemas, and its check with the library's own
validation.

:func:`form_spec` lists the config groups (their options from the ``conf/`` tree, the option the
defaults list picks) and the fields of each (type, default, choices, the doc line from the class
docstring's ``Attributes:``/``Args:`` section). :func:`compose_run` turns the form's choices into the
Hydra overrides a user would type, composes them with Hydra exactly as ``python -m flux_lightning``
does and validates the result with :func:`flux_lightning.config.validation.validate`; every problem comes
back next to the field it names. Nothing is loaded (validation probes sources, as the CLI does
before any weights load).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import shlex
import types
import typing
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..config.compose import composed
from ..config.schema import GROUP_SCHEMAS, config_dir

PROGRAM = "python -m flux_lightning"
_NULLS = ("null", "none", "~")


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
                "default": _jsonable(default),
                "doc": docs.get(f.name, ""),
                "choices": choices.get(key),
            }
        )
    return out


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (list, dict, str, int, float, bool)) or value is None:
        return value
    return str(value)


def _options(group: str) -> list[str]:
    folder = Path(config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _default_options() -> dict[str, str]:
    """group -> the option ``conf/train.yaml``'s defaults list picks."""
    from omegaconf import OmegaConf

    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "train.yaml"))["defaults"]:
        if isinstance(entry, dict):
            for group, option in entry.items():
                if not str(group).startswith("optional") and isinstance(option, str) and "$" not in option:
                    out[str(group)] = option
    return out


def _fields() -> list[dict]:
    """Every field of the form, in group order (the schema defaults; see :func:`form_spec`)."""
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


def form_spec() -> dict:
    """The form (a copy: the config tree does not change while the process runs); see :func:`_form_spec`."""
    return copy.deepcopy(_form_spec())


@functools.lru_cache(maxsize=1)
def _form_spec() -> dict:
    """The form: ``{"groups": [{"name", "options", "default_option", "fields": [...]}], "experiments": [...]}``.

    A field is ``{"key", "type": str|int|float|bool|choice|list, "nullable", "default", "doc",
    "choices"}``; ``default`` is the value ``python -m flux_lightning`` (no overrides) runs with,
    ``schema_default`` the dataclass's own default. The ``experiment`` group has no default option.
    """
    fields = _fields()
    composed = form_values({})
    defaults = _default_options()
    groups = [{"name": "experiment", "options": _options("experiment"), "default_option": None, "fields": []}]
    for name in GROUP_ORDER:
        groups.append(
            {
                "name": name,
                "options": _options(name),
                "default_option": defaults.get(name),
                "fields": [
                    dict(
                        {k: v for k, v in f.items() if k != "group"},
                        schema_default=f["default"],
                        default=composed.get(f["key"], f["default"]),
                    )
                    for f in fields
                    if f["group"] == name
                ],
            }
        )
    return {"groups": groups, "experiments": _options("experiment"), "command_prefix": PROGRAM}


def field_index() -> dict[str, dict]:
    """key -> field spec, for every field of the form."""
    return {f["key"]: f for f in _fields()}


# -- composing ----------------------------------------------------------------------------------
def config_dir_args(config_dir: str | os.PathLike | None, workdir: str | os.PathLike | None) -> list[str]:
    """``["--config-dir=<dir>"]`` for an experiment dir (relative to ``workdir`` when inside it), or []."""
    if not config_dir:
        return []
    path = Path(config_dir).expanduser().resolve()
    base = Path(workdir or os.getcwd()).resolve()
    return [f"--config-dir={path.relative_to(base).as_posix() if path.is_relative_to(base) else path}"]


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
    for name in _options("experiment"):
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


def run_dir_of(overrides: Iterable[str], workdir: str | os.PathLike) -> tuple[Path, dict]:
    """The run dir (absolute) that ``python -m flux_lightning <overrides>`` run in ``workdir`` uses,
    and a few facts of its config (``max_steps``, ``devices``)."""
    with composed(overrides, workdir=workdir, hydra_node=True) as cfg:
        facts = {"max_steps": cfg.trainer.get("max_steps"), "devices": _plain_value(cfg.trainer.get("devices"))}
        return Path(cfg.hydra.runtime.output_dir), facts


def _plain_value(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# -- values -------------------------------------------------------------------------------------
def coerce(value, spec: dict | None):
    """A form value (often a string) as the field's type. Raises ValueError with the fix."""
    kind = spec["type"] if spec else None
    nullable = spec.get("nullable", True) if spec else True
    key = spec["key"] if spec else "value"
    if isinstance(value, str) and spec is not None:
        text = value.strip()
        if nullable and (text.lower() in _NULLS or (text == "" and kind != "str")):
            return None
        if text == "" and kind in ("int", "float", "bool"):
            raise ValueError(f"{key} needs a value")
    if key == "trainer.devices" and isinstance(value, str):
        return _devices(value)
    if value is None:
        if spec is not None and not nullable:
            raise ValueError(f"{key} cannot be null; give a value")
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{key}={value!r} must be true or false")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be an integer")
        try:
            number = float(str(value).strip()) if isinstance(value, str) else value
            if (
                isinstance(number, float)
                and number.is_integer()
                and "." not in str(value)
                and "e" not in str(value).lower()
            ):
                return int(number)
            if isinstance(number, int):
                return number
        except ValueError:
            pass
        raise ValueError(
            f"{key}={value!r} must be an integer, e.g. {spec.get('default') if spec and spec.get('default') is not None else 1}"
        )
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be a number")
        try:
            return (
                float(value) if isinstance(value, str) else value if isinstance(value, (int, float)) else float(value)
            )
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} must be a number, e.g. 1e-4") from None
    if kind == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
        text = str(value).strip()
        if text.startswith("["):
            return _parse_hydra_value(text, key)
        return [_parse_hydra_value(v.strip(), key) for v in text.split(",") if v.strip()]
    return value


def _devices(text: str):
    """``trainer.devices`` as typed: a count (``2``, ``-1``), ``auto``, or device indices
    (``0,1`` or ``[0,1]``) as a list, the forms Lightning takes."""
    text = text.strip()
    items = [t.strip() for t in text.strip("[]").split(",") if t.strip()]
    if "," in text or text.startswith("["):
        if items and all(t.isdigit() for t in items):
            return [int(t) for t in items]
        raise ValueError(f"trainer.devices={text!r} must be a count, auto, or device indices like 0,1")
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def _parse_hydra_value(text: str, key: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"{key}={text}").value()
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors
        raise ValueError(f"{key}={text!r} is not a value Hydra reads ({str(err).splitlines()[0]})") from None


def hydra_value(value) -> str:
    """``value`` written as a Hydra override value that reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _reads_back(text, text):
        return text
    for quoted in (
        "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'",
        '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"',
    ):
        if _reads_back(quoted, text):
            return quoted
    return "'" + text.replace("'", "\\'") + "'"


def _reads_back(written: str, value: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(f"k={written}").value()
    except Exception:  # noqa: BLE001
        return False
    return isinstance(parsed, str) and parsed == value


def command_line(overrides: Iterable[str]) -> str:
    """The shell command a user types for these overrides."""
    return " ".join([PROGRAM, *(shlex.quote(o) for o in overrides)])


# -- problems -----------------------------------------------------------------------------------
def _causes(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _unparsable(overrides: list[str]) -> str | None:
    """The key (or group) of the first override Hydra's parser refuses, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:  # noqa: BLE001 - OverrideParseException and the grammar's own errors
            key = override.lstrip("+~").partition("=")[0].partition("@")[0]
            return key or None
    return None


def _compose_problem(err: Exception, overrides: list[str]) -> dict:
    """A Hydra composition error as a problem naming the field or group it is about, read from the
    exceptions' own attributes: a missing option's ``missing_cfg_file`` (``model/tinyy`` -> the
    ``model`` group), OmegaConf's ``full_key`` (``adapter.rnk``), or the override the parser refuses."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    causes = _causes(err)
    field, options = None, []
    for cause in causes:
        if isinstance(cause, MissingConfigException) and cause.missing_cfg_file:
            field = cause.missing_cfg_file.rpartition("/")[0] or cause.missing_cfg_file
            options = list(cause.options or [])
            break
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            field = cause.full_key
            break
        if isinstance(cause, OverrideParseException):
            field = _unparsable(overrides)
            break
    text = str(err).strip()
    cause = err.__cause__ or err.__context__
    why = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    first = text.splitlines()[0]
    message = f"{first} (options: {', '.join(options)})" if options else first
    if why and why not in message:
        message = f"{message} {why}"
    return {"field": field, "message": message}


# -- the API ------------------------------------------------------------------------------------
def selection_overrides(selection: dict, base: Iterable[str] = (), workdir=None, config_dir=None) -> list[str]:
    """``+experiment=<name>`` and ``group=option`` for each chosen option that differs from the one
    the composition would pick anyway (the defaults list, or the experiment's own choice); first
    ``--config-dir=<dir>`` when the experiment comes from an experiment dir."""
    out = config_dir_args(config_dir, workdir)
    experiment = selection.get("experiment")
    if experiment:
        out.append(f"+experiment={experiment}")
    chosen = {g: o for g, o in selection.items() if g != "experiment" and o not in (None, "")}
    if not chosen:
        return out
    try:
        with composed([*out, *base], workdir=workdir, hydra_node=True) as cfg:
            picked = dict(cfg.hydra.runtime.choices)
    except Exception:  # noqa: BLE001 - compose_run reports it
        picked = {}
    return out + [f"{g}={o}" for g, o in chosen.items() if picked.get(g) != o]


def form_values(selection: dict, *, workdir=None) -> dict:
    """key -> the value each form field has after composing ``selection`` (nothing else changed)."""
    try:
        return composed_form(selection, workdir=workdir)["values"]
    except Exception:  # noqa: BLE001 - an unknown option: no values to show
        return {}


def composed_form(selection: dict, *, config_dir=None, workdir=None) -> dict:
    """The form as ``selection`` (an experiment, maybe group options) composes it: ``{"choices":
    group -> the option picked (the experiment's own choices included), "values": key -> value}``.
    The page resets its groups and unchanged fields to these when an experiment or option is picked.

    Raises:
        hydra.errors.HydraException: an unknown experiment or option.
    """
    overrides = selection_overrides(selection, workdir=workdir, config_dir=config_dir)
    with composed(overrides, workdir=workdir, hydra_node=True) as cfg:
        choices = {g: o for g, o in cfg.hydra.runtime.choices.items() if g in GROUP_ORDER and isinstance(o, str)}
        return {"choices": choices, "values": _values_of(cfg, [f["key"] for f in _fields()])}


def _values_of(cfg, keys: Iterable[str]) -> dict:
    from omegaconf import OmegaConf

    out = {}
    for key in keys:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
            out[key] = _jsonable(_plain_value(value))
        except Exception:  # noqa: BLE001 - an interpolation that only resolves in a run
            try:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent)
                out[key] = OmegaConf.to_container(node, resolve=False).get(leaf)
            except Exception:  # noqa: BLE001
                out[key] = None
    return out


def _forecast(run) -> dict | None:
    """The run's VRAM forecast (:mod:`flux_lightning.model.forecast`) for the form, or None."""
    from ..model.forecast import forecast_run

    try:
        return forecast_run(run).as_dict()
    except Exception:  # noqa: BLE001 - a forecast never blocks the form
        return None


def compose_run(
    selection: dict,
    values: dict,
    *,
    base_overrides: Iterable[str] = (),
    extra: Iterable[str] = (),
    workdir: str | os.PathLike | None = None,
    check_sources: bool = True,
    config_dir: str | os.PathLike | None = None,
) -> dict:
    """The run the form describes, checked as the CLI checks it.

    Args:
        selection: group -> option (``{"experiment": "krea_lora", "model": "krea", ...}``).
        values: field key -> value the user changed (strings are read as the field's type).
        base_overrides / extra: raw Hydra overrides added after the group choices / after the values
            (e.g. the hardware page's ``trainer.devices=...``).
        workdir: the launch dir (relative data folders and ``outputs/`` are relative to it);
            default the current dir.
        check_sources: also probe data folders and the model source (as the CLI does before loading).
        config_dir: an experiment dir (``--config-dir``) the experiment comes from.

    Returns:
        ``{"overrides", "command", "ok", "problems": [{"field", "message"}], "values", "run_dir",
        "forecast"}`` (``forecast``: the VRAM forecast's parts and line once the run validates):
        ``values`` is every form field's value in the composed config, ``run_dir`` the run dir
        relative to ``workdir`` when it is inside it.
    """
    from ..config.validation import validate
    from ..errors import USER_ERRORS, ConfigError

    index = field_index()
    problems: list[dict] = []
    base, extra = list(base_overrides), list(extra)
    overrides = selection_overrides(selection, base, workdir, config_dir)
    for key, value in values.items():
        spec = index.get(key)
        try:
            if spec is None and isinstance(value, str):
                written = value.strip()
            else:
                written = hydra_value(coerce(value, spec))
        except ValueError as err:
            problems.append({"field": key, "message": str(err)})
            continue
        base.append(f"{key}={written}")
    overrides += base + extra
    result = {"overrides": overrides, "command": command_line(overrides), "values": {}, "run_dir": None}
    with ExitStack() as composing:  # the checks run inside the composition (its cwd, its hydra node)
        try:
            cfg = composing.enter_context(composed(overrides, workdir=workdir, hydra_node=True))
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors
            problems.append(_compose_problem(err, overrides))
            cfg = None
        if cfg is not None:
            result["values"] = _values_of(cfg, index)
            run_dir = Path(cfg.hydra.runtime.output_dir)
            base_dir = Path(os.getcwd())
            result["run_dir"] = (
                run_dir.relative_to(base_dir).as_posix() if run_dir.is_relative_to(base_dir) else str(run_dir)
            )
            try:
                run = validate(cfg, check_sources=check_sources)
                result["forecast"] = _forecast(run)
            except ConfigError as err:  # every problem with the field it is about (errors.Problem)
                problems += [{"field": p.field or None, "message": p.message} for p in err.problems]
            except USER_ERRORS as err:
                problems.append({"field": None, "message": str(err)})
            except Exception as err:  # noqa: BLE001 - an interpolation or value the config cannot resolve
                problems.append(_compose_problem(err, overrides))
    result["ok"] = not problems
    result["problems"] = problems
    return result
