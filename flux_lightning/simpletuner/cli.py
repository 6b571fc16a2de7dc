"""``python -m flux_lightning simpletuner_config=config/config.json [overrides]``.

:func:`expand_argv` replaces the ``simpletuner_config=PATH`` argument with the Hydra overrides
:func:`flux_lightning.simpletuner.overrides.to_overrides` makes of that file, placed before the user's own
overrides. An override whose key or config group the user also gives (or whose parent value the
user sets, e.g. ``callbacks.validation=null``) is left out, so the command line wins; Hydra would
otherwise reject two choices for one group.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config.schema import config_dir
from .overrides import SettingError, Translation, normalise, to_overrides

ARG = "simpletuner_config"
# Hydra's flags that take a value (the value is not an override)
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
}


def load_settings(path: str | Path) -> dict[str, Any]:
    """A SimpleTuner ``config.json`` as a dict, its ``lycoris_config`` file read in too.

    Paths inside stay as written (relative to the launch dir, as in SimpleTuner), except
    ``lycoris_config``, which is also looked for next to ``config.json``.
    """
    path = Path(path).expanduser()
    settings = _read_json(path)
    if not isinstance(settings, dict):
        raise SettingError(f"{path} must hold one JSON object of settings")
    settings = normalise(settings)
    lycoris = settings.get("lycoris_config")
    if isinstance(lycoris, str) and lycoris.strip():
        candidates = [Path(lycoris).expanduser(), path.parent / lycoris, path.parent / Path(lycoris).name]
        settings["lycoris_config"] = _read_json(
            next((p for p in candidates if p.is_file()), candidates[0]), "lycoris_config"
        )
    return settings


MAX_DEPTH = 16  # SimpleTuner's deepest setting (lycoris_config.apply_preset.module_algo_map.<module>) is 4 levels
MAX_LISTED = 20  # unrecognised keys named in the warning line; the rest are counted


def _read_json(path: Path, key: str | None = None) -> Any:
    where = f"{key}: " if key else ""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is no error
    except OSError as err:
        raise SettingError(f"{where}cannot read {path} ({err.strerror}); check the path") from None
    except RecursionError:
        raise SettingError(f"{where}{path} is nested too deeply to be a settings file; fix the file") from None
    except ValueError as err:
        raise SettingError(f"{where}{path} is not valid JSON ({err}); fix the file (no trailing commas)") from None
    deep = _too_deep(doc)
    if deep is not None:
        raise SettingError(
            f"{where}{path}: {deep} is nested deeper than {MAX_DEPTH} levels; no setting is, fix the file"
        )
    return doc


def _too_deep(doc: Any) -> str | None:
    """The path (``a.b[0]...``) of the first value nested deeper than :data:`MAX_DEPTH`, or None."""
    stack = [(doc, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth >= MAX_DEPTH:
            return where or "the top level"
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))
    return None


def listed(names: list[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c`` for a few names; the first ``limit`` and ``and K more`` for many."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def _key(override: str) -> str:
    """The key or group an override sets (``+``/``++``/``~`` and ``@package`` stripped)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).key_or_group
    except Exception:  # malformed: Hydra reports it itself
        return re.split(r"[=@]", override.lstrip("+~"), maxsplit=1)[0]


def _config_groups() -> set[str]:
    return {p.name for p in Path(config_dir()).iterdir() if p.is_dir() and not p.name.startswith("_")}


def expand_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``simpletuner_config=PATH`` replaced by the overrides of that file.

    Prints the overrides used, those the command line replaces, the keys without effect and the
    unrecognised keys (one line each) to stderr.

    Raises:
        SettingError: the file is unreadable or holds values without an equivalent here.
    """
    positions, skip = [], False  # indices of overrides (positional arguments)
    for i, arg in enumerate(argv[1:], start=1):
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
        else:
            positions.append(i)
    mine = [i for i in positions if argv[i].split("=", 1)[0] == ARG]
    if not mine:
        return list(argv)
    if len(mine) > 1:
        raise SettingError(f"{ARG} is given {len(mine)} times; give one config.json")
    path = argv[mine[0]].split("=", 1)[1]
    translation = to_overrides(load_settings(path))
    users = {_key(argv[i]) for i in positions if i != mine[0]}
    parents = {k for k in users if "." in k or k not in _config_groups()}  # values, not group choices
    kept, replaced = [], []
    for override in translation.overrides:
        key = override.split("=", 1)[0].lstrip("+")
        beaten = key in users or any(key.startswith(p + ".") for p in parents)
        (replaced if beaten else kept).append(override)
    _report(path, kept, replaced, translation)
    rest = [a for i, a in enumerate(argv) if i != mine[0]]
    first = positions[0]  # the user's first override, or where simpletuner_config was
    return rest[:first] + kept + rest[first:]


def _report(path: str, kept: list[str], replaced: list[str], t: Translation) -> None:
    def say(line):
        print(line, file=sys.stderr, flush=True)

    say(f"{ARG}={path}: {' '.join(kept) or '(nothing to override)'}")
    if replaced:
        say(f"{ARG}: the command line replaces {' '.join(replaced)}")
    if t.no_effect:
        say(
            f"warning: {ARG}: recognised but without effect here: "
            + "; ".join(f"{k} ({why})" for k, why in t.no_effect.items())
        )
    if t.unrecognised:
        say(f"warning: {ARG}: ignoring keys this trainer does not know: {listed(t.unrecognised)}")


def with_simpletuner_config(main: Callable) -> Callable:
    """Let a ``@hydra.main`` function take ``simpletuner_config=PATH`` on its command line.

    A bad config stops the program with exit code 2 and one ``error:`` line per problem.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if not args and not kwargs:  # run as the program: Hydra reads sys.argv
            try:
                sys.argv = expand_argv(sys.argv)
            except SettingError as err:
                for line in str(err).splitlines():
                    print(f"error: {ARG}: {line}", file=sys.stderr, flush=True)
                sys.exit(2)
        return main(*args, **kwargs)

    return wrapper
