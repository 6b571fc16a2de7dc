"""SimpleTuner settings, unchanged: a ``config.json`` as Hydra overrides of this library's config tree.

:func:`to_overrides` applies the key -> override table :data:`RULES`
(:mod:`flux_lightning.simpletuner.table`, written with the rule constructors of
:mod:`flux_lightning.simpletuner.rules`): every key (with or without the leading ``--``) ends up
mapped, reported as recognised-but-without-effect (with the reason), or listed as unrecognised, and
a value without an equivalent raises :class:`SettingError`, one line per key naming the fix.

The command line (``python -m flux_lightning simpletuner_config=config.json``) is in
:mod:`flux_lightning.simpletuner.cli`.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from ..errors import SettingError
from .rules import LineError, Outcome, shown
from .table import GROUPS, LR_SCHEDULERS, OPTIMIZERS, QUANTIZATION, RULES, TEXT_ENCODER_QUANTIZATION

__all__ = [
    "GROUPS", "LR_SCHEDULERS", "OPTIMIZERS", "QUANTIZATION", "RULES", "TEXT_ENCODER_QUANTIZATION",
    "SettingError", "Translation", "format_value", "normalise", "to_overrides",
]  # fmt: skip


class Translation(NamedTuple):
    """What :func:`to_overrides` made of a SimpleTuner config.

    Attributes:
        overrides: Hydra overrides (``key=value``), config-group choices first.
        unrecognised: keys this library does not know (nothing is dropped silently).
        no_effect: ``{key: reason}`` for recognised keys that change nothing here.
    """

    overrides: list[str]
    unrecognised: list[str]
    no_effect: dict[str, str]


def normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Keys without SimpleTuner's optional leading ``--``; a key given both ways must agree."""
    out: dict[str, Any] = {}
    for raw, v in settings.items():
        key = str(raw).strip().lstrip("-")
        if key in out and out[key] != v:
            raise SettingError(f"{key} is given twice with different values ({shown(out[key])}, {shown(v)}); keep one")
        out[key] = v
    return out


def to_overrides(settings: dict[str, Any]) -> Translation:
    """Hydra overrides equivalent to the SimpleTuner ``settings`` (a parsed ``config.json``).

    A key set to ``null`` counts as not given. A rule runs when its key, a key it reads (``reads``)
    or a key it owns (``read_by``) is given.

    Raises:
        SettingError: one line per value without an equivalent here, each naming the key and the fix.
    """
    settings = normalise(settings)
    out = Outcome(settings, RULES)
    given = {k for k, v in settings.items() if v is not None}
    needed = given | {RULES[k].read_by for k in given & RULES.keys() if hasattr(RULES[k], "read_by")}
    needed |= {k for k, rule in RULES.items() if given & set(getattr(rule, "reads", ()))}
    for key, rule in RULES.items():
        if key in needed and not hasattr(rule, "read_by"):
            try:
                rule(key, settings.get(key), out)
            except LineError as err:
                out.errors.append(str(err))
            except ValueError as err:
                out.errors.append(f"{key}={shown(settings.get(key))} {err}")
    if out.errors:
        raise SettingError("\n".join(out.errors))
    groups = [f"{k}={out.values[k][0]}" for k in GROUPS if k in out.values]
    values = [f"{k}={format_value(v)}" for k, (v, _) in sorted(out.values.items(), key=lambda kv: kv[0].lstrip("+"))]
    overrides = groups + [o for o in values if o.split("=", 1)[0] not in GROUPS]
    return Translation(overrides, out.unknown, out.no_effect)


def format_value(v: Any) -> str:
    """``v`` in Hydra's override grammar; strings are always quoted (prompts hold commas, quotes, ...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in v.items()) + "}"
    s = str(v).replace("${", "\\${")  # a literal "${" is not an interpolation
    # in Hydra's quoted strings \' is a quote, and backslashes before a quote or the end are doubled
    s = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), s)
    return f"'{s}'"
