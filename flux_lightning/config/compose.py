"""The run's config composed in-process, as ``python -m flux_lightning <args>`` composes it.

:func:`composed` is the one place the package composes with Hydra's compose API (the web UI's form
and launches, the wizard's check of what it wrote). It composes ``train`` from the package's config
tree (:func:`~flux_lightning.config.schema.config_dir`, job ``train``, as ``run/train.py``'s
``hydra.main``), in ``workdir`` (relative paths and ``outputs/`` mean what they mean to the CLI
started there), with each ``--config-dir DIR`` as a ``hydra.searchpath`` entry (the place the CLI's
flag takes in the search path: after the package's tree, before the schema). GlobalHydra and
HydraConfig are process-wide: one composition at a time (a lock), and the caller's Hydra state and
cwd come back when the block ends, so a long-lived server composes again and again.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .schema import config_dir, register

CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
JOB_NAME = "train"  # hydra.main's job name for run/train.py

_LOCK = threading.RLock()


def config_dir_arg(arg: str) -> str | None:
    """The folder of a ``--config-dir=DIR`` (or ``-cd=DIR``) argument, else None."""
    for flag in CONFIG_DIR_FLAGS:
        if arg.startswith(f"{flag}="):
            return arg[len(flag) + 1 :]
    return None


def _quoted(text: str) -> str:
    """``text`` as a single-quoted Hydra string that reads back as ``text`` (Hydra unescapes only
    backslashes before a quote or at the end, and ``\\'``)."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + escaped.replace("'", "\\'") + "'"


def _overrides(args: Iterable[str]) -> list[str]:
    """CLI arguments -> compose() overrides: ``--config-dir=DIR`` / ``--config-dir DIR`` (and
    ``-cd``) become one ``hydra.searchpath`` override, each dir absolute from the current dir.

    Raises:
        ValueError: another flag (``-m``, ``--cfg``: not a composition), or a flag without its dir.
        hydra.errors.SearchPathException: a config dir that is not a folder (the CLI's error).
    """
    from hydra.errors import SearchPathException

    args, dirs, rest = [str(a) for a in args], [], []
    i = 0
    while i < len(args):
        arg = args[i]
        folder = config_dir_arg(arg)
        if arg in CONFIG_DIR_FLAGS:
            if i + 1 >= len(args):
                raise ValueError(f"{arg} needs a folder: {arg} DIR")
            folder, i = args[i + 1], i + 1
        elif folder is None and arg.startswith("-"):
            raise ValueError(f"{arg}: only overrides and --config-dir DIR compose a run's config")
        if folder is None:
            rest.append(arg)
        else:
            path = os.path.abspath(os.path.expanduser(folder))
            if not os.path.isdir(path):
                raise SearchPathException(f"Additional config directory '{path}' not found")
            dirs.append(path)
        i += 1
    if not dirs:
        return rest
    return ["hydra.searchpath=[" + ",".join(_quoted(f"file://{d}") for d in dirs) + "]", *rest]


@contextmanager
def composed(
    args: Iterable[str] = (), *, workdir: str | os.PathLike | None = None, hydra_node: bool = False
) -> Iterator:
    """The config ``python -m flux_lightning <args>`` run in ``workdir`` composes, for the block.

    Inside the block Hydra is initialised, HydraConfig holds the run's ``hydra`` node (so
    ``${hydra:...}`` and the run-name resolver resolve; ``runtime.cwd`` is ``workdir``,
    ``runtime.output_dir`` the run dir, absolute) and the cwd is ``workdir``; afterwards the
    caller's GlobalHydra, HydraConfig and cwd are back.

    Args:
        args: Hydra overrides and ``--config-dir`` flags, as on the command line.
        workdir: the launch dir; default the current dir.
        hydra_node: also keep the ``hydra`` node in the config (``cfg.hydra.runtime.choices``, the
            run dir); without it the config is the one the CLI hands its task function.

    Raises:
        hydra.errors.HydraException: an override Hydra refuses (unknown key or option, bad value),
            a config dir that is not a folder.
        ValueError: an argument that is neither an override nor ``--config-dir``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import open_dict, read_write

    register()
    with _LOCK:
        backup = get_gh_backup()
        hydra_cfg = HydraConfig.instance().cfg
        cwd = os.getcwd()
        GlobalHydra.instance().clear()
        try:
            if workdir is not None and os.path.abspath(workdir) != cwd:
                os.chdir(workdir)
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name=JOB_NAME):
                cfg = compose("train", overrides=_overrides(args), return_hydra_config=True)
                with read_write(cfg.hydra), open_dict(cfg.hydra):
                    cfg.hydra.runtime.cwd = os.getcwd()
                HydraConfig.instance().set_config(cfg)  # so ${hydra:...} and the run_name resolver resolve
                run_dir = os.path.abspath(str(cfg.hydra.run.dir))
                with read_write(cfg.hydra), open_dict(cfg.hydra):
                    cfg.hydra.runtime.output_dir = run_dir
                HydraConfig.instance().set_config(cfg)
                if not hydra_node:
                    with open_dict(cfg):
                        del cfg["hydra"]
                yield cfg
        finally:
            os.chdir(cwd)
            HydraConfig.instance().cfg = hydra_cfg
            restore_gh_from_backup(backup)
