"""A command line Hydra cannot compose (a value of the wrong type, an unknown key or option, a
parse error) is one ``error:`` line naming the field, exit 2 -- not Hydra's multi-line report
(exit 1) that names the override as Hydra rewrote it.

Hydra reports composition errors itself, inside ``hydra.main`` (``run_and_report``). While
:func:`one_line_compose_errors` wraps the entry point, those errors are turned into one line before
the job starts; errors inside the job are the job's (``train.main`` maps them).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable

_state = {"job_started": False}
_OVERRIDE = re.compile(r"override '?([+~]{0,2}[\w.@/\-\[\]]+?)'?(?:=(.*?))?\.?$")


class _Composition(BaseException):  # not an Exception: Hydra's reporter lets it through
    pass


def job_started() -> None:
    """Called first thing in the job: from here errors are the job's, not composition's."""
    _state["job_started"] = True


def one_line(err: BaseException) -> str:
    """Hydra's composition error ``err`` as one line naming the field."""
    from ..callbacks.redaction import redact_secrets

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    head = lines[0] if lines else type(err).__name__
    override = getattr(err, "override", None)  # OverrideParseException: the text it could not parse
    if override is not None:
        reason = next((line for line in lines if not line.startswith("See ")), "cannot parse it")
        return (
            f"cannot parse the override {redact_secrets(str(override))!r} ({reason}); write key=value, "
            "quoting values with spaces or brackets"
        )
    found = _OVERRIDE.search(head)
    key = found.group(1).lstrip("+~") if found else None
    value = (found.group(2) or "") if found else ""
    if key and not value:  # "Could not override 'x'. To append to your config use +x=<value>"
        given = re.search(rf"{re.escape(key)}=(.*)$", " ".join(lines))
        value = given.group(1) if given else ""
    cause = err.__cause__
    if cause is not None and hasattr(cause, "full_key"):
        reason = (getattr(cause, "msg", None) or str(cause)).splitlines()[0].strip()
        field = str(getattr(cause, "full_key", "") or "")
        if key and not field.startswith(key.split(".")[0]):
            field = (
                f"{key}[...].{field}"
                if value.lstrip().startswith("[") and field
                else (f"{key}.{field}" if field else key)
            )
        field = field or key or "config"
        told = f" (in {redact_secrets(f'{key}={value}')})" if key and value else ""
        return f"{field}: {reason}{told}; fix the value (python -m flux_lightning --cfg job prints every field)"
    if "Config search path:" in lines:  # a missing group option: name the options, not the search path
        lines = lines[: lines.index("Config search path:")]
    head, *options = lines
    if options and options[0].startswith("Available options"):
        head = f"{head}; {options[0].rstrip(':').lower()}: {', '.join(options[1:])}"
    return f"{redact_secrets(head)} (python -m flux_lightning --help lists the config groups and options)"


def one_line_compose_errors(main: Callable) -> Callable:
    """Wrap a ``hydra.main`` entry point: composition errors -> ``error: <one line>``, exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        import hydra._internal.utils as hydra_utils
        from hydra.errors import CompactHydraException

        original = hydra_utils.run_and_report
        _state["job_started"] = False

        def run_and_report(func):
            def guarded():
                try:
                    return func()
                except CompactHydraException as err:
                    if _state["job_started"]:
                        raise
                    raise _Composition(one_line(err)) from None

            return original(guarded)

        hydra_utils.run_and_report = run_and_report
        try:
            return main(*args, **kwargs)
        except _Composition as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        finally:
            hydra_utils.run_and_report = original

    return wrapper
