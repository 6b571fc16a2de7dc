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
"""

from __future__ import annotations

import gc

_state = {"frozen": False}


def freeze_startup_heap() -> bool:
    """``gc.freeze()`` the objects alive now, the first time it is called in this process; returns
    whether it froze (False on later calls)."""
    if _state["frozen"]:
        return False
    _state["frozen"] = True
    gc.collect(1)  # the young generations' garbage first (milliseconds), so it is not kept
    gc.freeze()
    return True
