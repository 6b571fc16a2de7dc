"""The "New run" form with its values, checked with the library's own validation.

:func:`form_spec` is the form: the groups and fields :mod:`form_fields` describes from the schemas,
each with the value ``python -m flux_lightning`` (no overrides) runs with. :func:`compose_run` turns
the form's choices into the Hydra overrides a user would type, composes them as the CLI does
(:func:`flux_lightning.config.compose.composed`) and validates the result with
:func:`flux_lightning.config.validation.validate`; every problem comes back next to the field it
names. Nothing is loaded (validation probes sources, as the CLI does before any weights load).
"""

from __future__ import annotations

import copy
import functools
import os
import shlex
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from ..config.compose import composed
from .form_fields import GROUP_ORDER, all_fields, default_options, field_index, group_options, jsonable

PROGRAM = "python -m flux_lightning"
_NULLS = ("null", "none", "~")


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
    every = all_fields()
    values = form_values({})
    defaults = default_options()
    groups = [{"name": "experiment", "options": group_options("experiment"), "default_option": None, "fields": []}]
    for name in GROUP_ORDER:
        groups.append(
            {
                "name": name,
                "options": group_options(name),
                "default_option": defaults.get(name),
                "fields": [
                    dict(
                        {k: v for k, v in f.items() if k != "group"},
                        schema_default=f["default"],
                        default=values.get(f["key"], f["default"]),
                    )
                    for f in every
                    if f["group"] == name
                ],
            }
        )
    return {"groups": groups, "experiments": group_options("experiment"), "command_prefix": PROGRAM}


# -- composing ----------------------------------------------------------------------------------
def config_dir_args(config_dir: str | os.PathLike | None, workdir: str | os.PathLike | None) -> list[str]:
    """``["--config-dir=<dir>"]`` for an experiment dir (relative to ``workdir`` when inside it), or []."""
    if not config_dir:
        return []
    path = Path(config_dir).expanduser().resolve()
    base = Path(workdir or os.getcwd()).resolve()
    return [f"--config-dir={path.relative_to(base).as_posix() if path.is_relative_to(base) else path}"]


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
        return {"choices": choices, "values": _values_of(cfg, [f["key"] for f in all_fields()])}


def _values_of(cfg, keys: Iterable[str]) -> dict:
    from omegaconf import OmegaConf

    out = {}
    for key in keys:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
            out[key] = jsonable(_plain_value(value))
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
