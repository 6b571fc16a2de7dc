"""Read SimpleTuner's ``multidatabackend.json`` unchanged into typed backend configs."""

from __future__ import annotations

import json
import logging
import types
import typing
from pathlib import Path

from ..errors import DataError
from .config import IMAGE_FIELDS, TEXT_FIELDS, DatasetConfig, ImageBackendConfig, TextEmbedsConfig

log = logging.getLogger(__name__)


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _expected(tp) -> tuple[list, bool]:
    """The plain types a field annotation allows, and whether null is allowed."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return [a for a in args if a is not type(None)], type(None) in args


def _fits(value, tp) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    return isinstance(value, tp)


def _fix(value, tp) -> str:
    """A hint for a value of the wrong type: the JSON to write instead, when it is clear."""
    if isinstance(value, str):
        text = value.strip().lower()
        if tp is bool and text in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return f"; write {'true' if text in ('true', 'yes', 'on', '1') else 'false'} (no quotes)"
        if tp in (int, float):
            try:
                number = float(value)
            except ValueError:
                return ""
            if tp is float or number.is_integer():
                return f"; write {int(number) if number.is_integer() else number} (no quotes)"
    if value is None:
        return "; give a value or leave the key out for the default"
    return ""


def type_problems(cls, values: dict) -> list[str]:
    """``key=<json> must be <type>[; the fix]`` for each value of ``values`` whose JSON type does
    not match the field of dataclass ``cls``. Strings are never converted: ``"2"`` for an integer,
    or ``"no"`` for a boolean (which would otherwise read as true), is reported with the fix."""
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in values.items():
        if key == "instance_data_dir":  # Any in the dataclass: a folder or a list of folders
            folders = value if isinstance(value, list) and value else [value]
            if all(isinstance(v, str) for v in folders) or value is None:
                continue
            out.append(f"instance_data_dir={json.dumps(value)} must be a folder path (a string) or a list of them")
            continue
        allowed, nullable = _expected(hints[key])
        if (value is None and nullable) or any(_fits(value, tp) for tp in allowed):
            continue
        kinds = [_KIND.get(tp) or ("a list of numbers" if typing.get_origin(tp) is list else str(tp)) for tp in allowed]
        kinds += ["null"] if nullable else []
        out.append(f"{key}={json.dumps(value)} must be {' or '.join(kinds)}{_fix(value, allowed[0])}")
    return out


def load_backend_file(path: str | Path) -> tuple[list[ImageBackendConfig], TextEmbedsConfig]:
    """Image backends and the text-embeds backend of a ``multidatabackend.json`` document.

    Keys this library does not use are reported in one warning per backend, never dropped silently.
    """
    path = Path(path).expanduser()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"dataset.backend_file: cannot read {path} ({err.strerror})") from None
    except ValueError as err:
        raise DataError(f"dataset.backend_file: {path} is not valid JSON ({err})") from None
    except RecursionError:
        raise DataError(
            f"dataset.backend_file: {path} is nested too deeply; it must hold a list of backend objects"
        ) from None
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise DataError(f"dataset.backend_file: {path} must hold a JSON list of backend objects")
    if not doc:
        raise DataError(f"dataset.backend_file: {path} holds no backends; add an image backend (id, instance_data_dir)")
    images, texts, problems = [], [], []
    for n, entry in enumerate(doc):
        is_text = entry.get("dataset_type") == "text_embeds"
        cls = TextEmbedsConfig if is_text else ImageBackendConfig
        known = TEXT_FIELDS if is_text else IMAGE_FIELDS
        ignored = sorted(set(entry) - known)
        name = entry.get("id", f"#{n}")
        if ignored:
            log.warning("%s: backend %r: ignoring keys this trainer does not use: %s", path.name, name, ignored)
        values = {k: v for k, v in entry.items() if k in known}
        wrong = [f"dataset.backend_file: {path}: backend {name!r}: {msg}" for msg in type_problems(cls, values)]
        if wrong:
            problems += wrong
            continue
        if is_text:
            texts.append(TextEmbedsConfig(**values))
        else:
            values.setdefault("id", str(name))
            images.append(ImageBackendConfig(**values))
    if problems:  # one line each; validate() / the CLI list them under "invalid config"
        raise DataError("\n  - ".join(problems))
    enabled_texts = [t for t in texts if not t.disabled]
    if len(enabled_texts) > 1 and sum(t.default for t in enabled_texts) != 1:
        raise DataError(f"dataset.backend_file: {path} has several text_embeds backends; mark one default: true")
    text = next((t for t in enabled_texts if t.default), enabled_texts[0] if enabled_texts else TextEmbedsConfig())
    return images, text


def resolve_dataset(cfg: DatasetConfig) -> DatasetConfig:
    """``cfg`` with ``backend_file`` (if any) read into ``backends``/``text_embeds``."""
    if cfg.backend_file is None:
        return cfg
    images, text = load_backend_file(cfg.backend_file)
    extra = cfg.shorthand_fields_set()
    if extra:  # e.g. the default dataset option's resolution under `dataset.backend_file=...`
        log.warning(
            "dataset.backend_file: ignoring the single-folder fields %s (each backend in %s sets its own)",
            ", ".join(f"dataset.{f}={getattr(cfg, f)!r}" for f in extra),
            cfg.backend_file,
        )
    return cfg.with_backends(images, text)
