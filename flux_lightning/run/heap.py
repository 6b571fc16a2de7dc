"""The start-up heap out of the cyclic garbage collector's way (the command line's process only).

By the time the first job starts, the process holds the objects of every module imported so far
(torch, Lightning, torchmetrics, Hydra, ... about a million objects), and each full collection
of the cyclic garbage collector walks all of them again: on this project's 2-core machine the
collections between the job's start and the first optimizer step took about 1 s of CPU, most of it
walking modules that never become garbage. :func:`freeze_startup_heap` moves those objects to the
collector's permanent generation (``gc.freeze()``, CPython's documented way to do this), so later
collections walk only what the run creates: models, tensors, batches. Nothing is computed
differently; the cost is the cyclic garbage that exists at that moment, kept for the life of the
process (the young generations are collected first, so this is a few objects, not a run's models).

Called once per process, at the start of the first job (:func:`flux_lightning.run.train.main`):
importing the library changes no collector state, and a sweep's later jobs freeze nothing (a
previous job's objects that are garbage but not yet collected must stay collectable).

The imports themselves: while torch, Lightning (-> torchmetrics, torchvision, transformers, scipy) and
their kin load, the collector runs full collections again and again as the heap grows (each walks
every object so far; about a million at the end). When this process *is* one of our commands
(``python -m flux_lightning`` or ``python -m flux_lightning.<command>``, read from
:data:`sys.orig_argv` while Python is still locating the module), ``flux_lightning/__init__.py``
pauses the collector for its imports (:func:`pause_for_command_imports`) and, when they are done,
collects once, freezes what is left and turns the collector back on
(:func:`resume_after_command_imports`). Any other process importing the library (a script, a
notebook, pytest, another tool's ``-m``) is left alone.
"""

from __future__ import annotations

import gc
import sys

_state = {"frozen": False, "paused": False}
_OPTIONS_WITH_VALUE = ("-X", "-W")  # python -X importtime -m flux_lightning ...


def command_module(orig_argv: list[str] | None = None, argv: list[str] | None = None) -> str | None:
    """The module this interpreter was started to run with ``-m``, while it is still being located
    (``sys.argv[0]`` is ``"-m"`` until then), else None."""
    orig_argv = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)
    argv = sys.argv if argv is None else argv
    if argv[:1] != ["-m"]:
        return None
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg in _OPTIONS_WITH_VALUE:
            next(args, None)
        elif arg == "-c" or not arg.startswith("-"):
            return None
    return None


def pause_for_command_imports() -> bool:
    """Pause the cyclic collector when this process is ``python -m flux_lightning[.<command>]``
    (see the module's docstring); returns whether it paused."""
    module = command_module()
    if module is None or not (module == "flux_lightning" or module.startswith("flux_lightning.")):
        return False
    if not gc.isenabled():
        return False
    gc.disable()
    _state["paused"] = True
    return True


def resume_after_command_imports() -> None:
    """After a paused import: collect the imports' garbage once, freeze the rest, collector on."""
    if not _state["paused"]:
        return
    _state["paused"] = False
    gc.collect()
    gc.freeze()
    gc.enable()


def freeze_startup_heap() -> bool:
    """``gc.freeze()`` the objects alive now, the first time it is called in this process; returns
    whether it froze (False on later calls)."""
    if _state["frozen"]:
        return False
    _state["frozen"] = True
    gc.collect(1)  # the young generations' garbage first (milliseconds), so it is not kept
    gc.freeze()
    return True
