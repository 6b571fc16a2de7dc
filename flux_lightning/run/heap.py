"""Start-up without the cyclic garbage collector's full walks (the command line's process only).

Importing torch, Lightning, torchmetrics, Hydra, diffusers ... creates about a million objects that
live as long as the process, and CPython's cyclic collector walks all of them again at each full
(generation-2) collection, which the growing heap keeps triggering: on this project's 2-core
machine about 1 s of CPU while the modules import and another 0.3-0.4 s before the first optimizer
step, walking modules that never become garbage. Three documented levers (``gc.set_threshold``,
``gc.freeze``, ``gc.collect``), used only by the command line (``python -m flux_lightning``, ``flux-lightning``):

- :func:`startup_imports` wraps the entry point's imports: full collections are postponed (young
  collections go on, so short-lived cycles are still freed) and what the imports leave alive moves
  to the collector's permanent generation, out of every later walk.
- The postponement lasts through the first job's set-up (compose, model load, the before-training
  baselines, all of which import more) and ends when the first batch arrives (a callback of
  :func:`flux_lightning.run.train.train`, or when the job ends before one) with one full collection
  of what is not frozen, so the set-up's cyclic garbage is freed before the first step's memory
  peak; from then on the collector runs as it always does. ``flux-lightning ui|configure|lora`` end
  it right after their imports.

Nothing is computed differently. The costs: the imports' cyclic garbage that survives the young
collections is kept for the life of the process (about 0.2 MB: a few hundred objects), and cyclic
garbage of the set-up that survives two young collections waits for the full collection before
the first step. Importing the library changes no collector state. On CPython 3.14 and later
(an incremental collector, which ignores the third threshold) only the freeze applies.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_NO_FULL_COLLECTIONS = 1 << 30  # young collections between two full ones: never, until resumed
_state: dict = {"thresholds": None}


def postponed() -> bool:
    """Whether full collections are postponed (the command line's start-up)."""
    return _state["thresholds"] is not None


def resume_full_collections() -> None:
    """End the postponement: the collector's thresholds as they were, and one full collection of what
    is not frozen, so the set-up's cyclic garbage is freed now (nothing if not postponed)."""
    thresholds, _state["thresholds"] = _state["thresholds"], None
    if thresholds is not None:
        gc.set_threshold(*thresholds)
        gc.collect()


@contextmanager
def startup_imports() -> Iterator[None]:
    """Postpone full collections, run the entry point's imports, then freeze what they left alive.
    The postponement outlives the block (see the module docstring); an import error ends it."""
    if not postponed():
        _state["thresholds"] = gc.get_threshold()
        gc.set_threshold(_state["thresholds"][0], _state["thresholds"][1], _NO_FULL_COLLECTIONS)
    try:
        yield
    except BaseException:
        resume_full_collections()
        raise
    gc.collect(1)  # the young generations' garbage first (milliseconds), so it is not kept
    gc.freeze()
