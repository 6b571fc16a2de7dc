"""What the web UI may run: the overrides and command-line flags a request may carry.

A Hydra override can name code: ``+callbacks.x._target_=pathlib.Path.write_text`` (with its
``_args_``) makes the run call any function as the UI's owner, and ``hydra.*`` reaches Hydra's own
callbacks and launchers. On a shared machine anyone who can reach the UI could do that, so unless the
server was started with ``--allow-code-overrides`` a request may not:

- name a ``_target_`` / ``_args_`` / ``_partial_`` / ``_recursive_`` / ``_convert_`` node, in a key or
  inside a dict value;
- set ``hydra.*`` or choose a ``hydra/...`` group option;
- choose a group option by path (``experiment=../../tmp/x``: a YAML from anywhere);
- pass ``--config-dir`` other than the experiment dirs the server was started with, or any other flag;
- point ``simpletuner_config=`` outside the workdir and the data roots.

:func:`refusal` answers for one override: None, or the one-line reason naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config.compose import config_dir_arg

CODE_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
OPT_IN = "--allow-code-overrides"
_OPTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def split_flags(lines: list[str]) -> list[str]:
    """Free-form lines -> arguments: ``--config-dir DIR`` becomes ``--config-dir=DIR`` (one item)."""
    out = []
    for line in lines:
        for flag in ("--config-dir ", "-cd "):
            if line.startswith(flag):
                line = "--config-dir=" + line[len(flag) :].strip()
        out.append(line)
    return out


def groups() -> set[str]:
    """The config groups (the folders of the config tree): their values are option names."""
    from ..config.schema import config_dir

    return {p.name for p in Path(config_dir()).iterdir() if p.is_dir() and not p.name.startswith("_")}


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _code_in(value) -> str | None:
    """The first code key inside a parsed override value (dict keys, nested lists), else None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if any(c in str(k) for c in CODE_KEYS):
                return str(k)
            found = _code_in(v)
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for v in value:
            found = _code_in(v)
            if found:
                return found
    return None


def refusal(arg: str, *, config_dirs: list[Path], roots: list[Path], workdir: Path) -> str | None:
    """Why the UI refuses to run ``arg`` (one override or flag), or None when it may."""
    fix = f"; the web UI runs no code named in a request (start it with {OPT_IN} to allow this)"
    folder = config_dir_arg(arg)
    if folder is not None:
        path = (workdir / Path(folder).expanduser()).resolve()
        if path not in [Path(d).resolve() for d in config_dirs]:
            known = ", ".join(str(d) for d in config_dirs) or "none"
            return f"--config-dir {folder} is not one of this UI's experiment dirs ({known}); start the UI with --config-dir {folder}"
        return None
    if arg.startswith("-"):
        return f"{arg.split('=')[0]}: the web UI takes overrides (key=value) and --config-dir only"
    head = arg.split("=", 1)[0]
    if any(c in head for c in CODE_KEYS):
        return f"{head} names code{fix}"
    if head.lstrip("+~").startswith(("hydra.", "hydra/")) or head.lstrip("+~") == "hydra":
        return f"{head.lstrip('+~')}: Hydra's own settings (callbacks, launchers, run dir) are not set from the web UI{fix}"
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_override(arg)
    except Exception:  # noqa: BLE001 - composing reports Hydra's own message
        return None
    key = override.key_or_group
    if any(c in key for c in CODE_KEYS):
        return f"{arg.split('=')[0]} names code ({key}){fix}"
    if key == "hydra" or key.startswith(("hydra.", "hydra/")):
        return f"{key}: Hydra's own settings (callbacks, launchers, run dir) are not set from the web UI{fix}"
    if override.is_delete():
        return None
    try:
        value = override.value()
    except Exception:  # noqa: BLE001
        return None
    code = _code_in(value)
    if code:
        return f"{key} is given a {code} node: it names code{fix}"
    if key in groups() and not (isinstance(value, str) and _OPTION.match(value) and ".." not in value):
        return f"{key}={value}: a group option is a name from the config tree (conf/{key}/<name>.yaml), not a path"
    if key == "simpletuner_config" and isinstance(value, str):
        path = (workdir / Path(value).expanduser()).resolve()
        if not _inside(path, roots):
            return f"simpletuner_config={value} is outside the folders this UI may read; start the UI with --data-root <folder>"
    return None


def field_of_arg(arg: str) -> str:
    """The field a refused argument is shown next to: its key (``+`` / ``~`` dropped), or the flag."""
    if arg.startswith("-"):
        return "config_dir" if config_dir_arg(arg) is not None else arg.split("=")[0]
    return re.split(r"[=@]", arg.lstrip("+~"), maxsplit=1)[0]
