"""How a SimpleTuner rule is written: value converters, what rules produce, rule constructors.

A rule is a function ``(key, value, out)`` that reads one SimpleTuner key's value and records what it
means here in an :class:`Outcome` (override values, no-effect notes, errors). The constructors
(:func:`value`, :func:`choice`, :func:`no_effect`, ...) build the common rules; the table of every
key is :data:`flux_lightning.simpletuner.table.RULES`, applied by
:func:`flux_lightning.simpletuner.overrides.to_overrides`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

MAX_INT = 2**32 - 1  # the largest whole number a setting takes here (a seed's range)
MAX_RANK = 3072  # Flux.1's width: no layer's update has a higher rank


class LineError(ValueError):
    """A rule's error that is already a whole line (rules reading several keys name them themselves)."""


def shown(v: Any, limit: int = 80) -> str:
    """``repr(v)``, cut to ``limit`` characters (an error line stays one short line whatever the file holds)."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# ----------------------------------------------------------------------------- value converters
_FALSE = {"", "0", "false", "no", "off", "none"}  # how SimpleTuner reads booleans from config.json
_TRUE = {"1", "true", "yes", "on"}


def as_bool(v: Any) -> bool:
    """A boolean as SimpleTuner reads one from ``config.json`` (``true``, ``"yes"``, ``1``, ``"off"``, ...)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, str) and v.strip().lower() in _FALSE | _TRUE:
        return v.strip().lower() in _TRUE
    raise ValueError("is not true or false; write true or false")


def as_int(v: Any) -> int:
    """A whole number (``16``, ``"16"``, ``16.0``); not a boolean."""
    try:
        f = float(v) if not isinstance(v, bool) else 0.5
    except (TypeError, ValueError):
        f = 0.5
    if not f.is_integer():
        raise ValueError("is not a whole number; write one, e.g. 16")
    if abs(f) > MAX_INT:
        raise ValueError(f"is too large; write a whole number up to {MAX_INT}")
    return int(f)


def as_rank(v: Any) -> int:
    """A LoRA/LoKr rank: a whole number from 1 to Flux.1's width (no layer's update has a higher rank)."""
    rank = as_int(v)
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"is not a rank from 1 to {MAX_RANK} (Flux.1's width); write one, e.g. 16")
    return rank


def as_float(v: Any) -> float:
    """A finite number (``1e-4``, ``"1e-4"``); not a boolean, NaN or infinity."""
    if isinstance(v, bool):
        raise ValueError("is not a number; write one, e.g. 1e-4")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("is not a number; write one, e.g. 1e-4") from None
    if not math.isfinite(f):
        raise ValueError("is not a finite number; write one, e.g. 1e-4")
    return f


def as_str(v: Any) -> str:
    """A string; a JSON object or list is refused."""
    if isinstance(v, (dict, list)):
        raise ValueError("must be a string; quote it")
    return str(v)


def as_int_or_str(v: Any) -> int | str:
    """An int stays an int, anything else becomes a string (``validation_resolution``: 1024 or "1024x768")."""
    return v if isinstance(v, int) and not isinstance(v, bool) else as_str(v)


def optional(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``null`` / ``"none"`` / ``""`` -> None, anything else -> ``conv(value)``."""

    def convert(v):
        return None if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")) else conv(v)

    return convert


def name_of(v: Any) -> str:
    """A choice's name as compared here: stripped, lower case."""
    return str(v).strip().lower()


# ----------------------------------------------------------------------------- rule building blocks
class Outcome:
    """What the rules produce: override values (with the key that set them), notes and errors."""

    def __init__(self, settings: dict[str, Any], known: Collection[str]):
        self.settings = settings
        self.values: dict[str, tuple[Any, str]] = {}
        self.no_effect: dict[str, str] = {}
        self.errors: list[str] = []
        self.unknown: list[str] = sorted(k for k in settings if k not in known)

    def set(self, path: str, value: Any, key: str) -> None:
        if path in self.values and self.values[path][0] != value:
            other = self.values[path][1]
            self.errors.append(
                f"{other}={shown(self.settings.get(other))} and {key}={shown(self.settings.get(key))} both set {path} "
                "to different values; keep one of them"
            )
        self.values.setdefault(path, (value, key))

    def given(self, key: str) -> bool:
        return self.settings.get(key) is not None

    def true(self, key: str) -> bool:
        return self.given(key) and self.read(key, as_bool)

    def read(self, key: str, conv: Callable[[Any], Any]) -> Any:
        """Another key's value, converted; a bad value is reported under that key."""
        try:
            return conv(self.settings[key])
        except ValueError as err:
            raise LineError(f"{key}={shown(self.settings[key])} {err}") from None


Rule = Callable[[str, Any, Outcome], None]  # (key, value, out); raises ValueError("<what is wrong>; <fix>")


def value(path: str, conv: Callable[[Any], Any] = as_str) -> Rule:
    """The key sets ``path`` to ``conv(value)``."""

    def rule(key, v, out):
        out.set(path, conv(v), key)

    return rule


def choice(path: str, names: dict[str, Any], fix: str | None = None) -> Rule:
    """The key picks ``names[value]`` for ``path`` (a config group or a value); other values fail."""
    fix = fix or f"use one of {', '.join(names)}"

    def rule(key, v, out):
        if name_of(v) not in names:
            raise ValueError(f"has no equivalent here; {fix}")
        out.set(path, names[name_of(v)], key)

    return rule


def one_of(path: str, *names: str) -> Rule:
    """The key sets ``path`` to its value, one of ``names`` (same spelling here and in SimpleTuner)."""
    return choice(path, {n: n for n in names})


def no_effect(reason: str) -> Rule:
    """Recognised, but changes nothing here (the reason is reported)."""

    def rule(key, v, out):
        out.no_effect[key] = reason

    rule.no_effect = reason
    return rule


def read_by(owner: str) -> Rule:
    """The key is read by ``owner``'s rule, which runs when either key is given."""

    def rule(key, v, out):
        pass

    rule.read_by = owner
    return rule


def unless(condition: Callable[[Outcome], bool], reason: str, rule: Rule) -> Rule:
    """``rule``, or a no-effect note when ``condition`` holds (e.g. a LoRA knob with lora_type=lycoris)."""

    def wrapped(key, v, out):
        if condition(out):
            out.no_effect[key] = reason
        else:
            rule(key, v, out)

    return wrapped


def true_sets(path: str, value_: Any) -> Rule:
    """A flag that, when true, sets ``path`` to ``value_`` (false changes nothing)."""

    def rule(key, v, out):
        if as_bool(v):
            out.set(path, value_, key)

    return rule


def only(expected: str, fix: str) -> Rule:
    """The key must say ``expected`` (e.g. ``model_family: flux``); anything else fails with ``fix``."""

    def rule(key, v, out):
        if name_of(v) != expected:
            raise ValueError(f"is not supported; {fix}")

    return rule
