"""SIGTERM / SIGINT: stop within seconds wherever the run is, writing a resumable checkpoint first.

Schedulers and ``timeout`` send SIGTERM, wait, then SIGKILL; Ctrl+C sends SIGINT. Both set one
process-wide stop flag (:func:`install`), and the run stops at the next safe point:

* before training (model loading, caching): at once, like ``KeyboardInterrupt`` (every cache
  entry is written atomically, so nothing half-written is left); the caching loops check the flag
  between batches too;
* while training: after the current optimizer step (:class:`GracefulStop`'s
  ``on_train_batch_end``), and inside the long loops of the evaluation callbacks (validation
  sampler steps, eval-loss batches) via :func:`check`.

Lightning handles SIGTERM itself during ``fit`` (``_SignalConnector``): its handler sets
``trainer.received_sigterm`` and then calls the handler that was installed before it, ours; its
loops raise ``SIGTERMException`` at the end of the step, after the callbacks. We stop in the same
place (the step's ``on_train_batch_end``) or earlier (inside an evaluation loop), and add what
Lightning does not do: :meth:`GracefulStop.on_exception` writes ``last.ckpt`` at the current step
through the run's ``ModelCheckpoint`` (the same moment in the step as its periodic checkpoints,
so the resume is bit-exact), and ``main`` prints one line and exits with 128 + the signal number.
A second signal stops the process at once (the default action).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..errors import StopRequested
from .hooks import FinishStep

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


_state = {"signum": None, "immediate": True, "collective": False, "previous": {}, "wakeup": None}
GRACE_S = 5.0  # before training, a stop the main thread has not acted on by then ends the process


def requested() -> int | None:
    """The signal number received, or None."""
    return _state["signum"]


def check() -> None:
    """Raise :class:`StopRequested` if a stop signal arrived: call this in every long loop. In a
    training run of several ranks it does nothing: the ranks stop together, at the end of a step
    (:meth:`GracefulStop.on_train_batch_end`), since the checkpoint written then is a collective."""
    if _state["signum"] is not None and not _state["collective"]:
        raise StopRequested(_state["signum"])


def set_immediate(value: bool) -> None:
    """``True``: a signal raises at once (nothing to save); ``False``: it only sets the flag, and the
    run stops at the next :func:`check` (training: there is a step to checkpoint first)."""
    _state["immediate"] = value


def _handler(signum, frame) -> None:
    if _state["signum"] is not None:  # the second signal: stop now, the default way
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    _state["signum"] = signum
    log.warning(
        "received %s: stopping at the next safe point (send it again to stop at once)", signal.Signals(signum).name
    )
    if _state["immediate"]:
        raise StopRequested(signum)


def install() -> None:
    """Route SIGTERM and SIGINT to the stop flag (main thread only; a no-op elsewhere)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    _state.update(signum=None, immediate=True, collective=False)
    for s in SIGNALS:
        _state["previous"][s] = signal.signal(s, _handler)
    _start_watchdog()


def _start_watchdog() -> None:
    """Python runs a signal handler only between bytecodes: a VAE encode of large images is one C call
    that can take minutes on a loaded CPU. The C-level handler writes the signal number to a wakeup fd
    at once; this thread reads it and, before training (nothing to checkpoint, every cache entry is
    renamed into place whole), ends the process if the main thread has not within :data:`GRACE_S`:
    the temporary files being written are removed first, so the cache stays consistent."""
    import os
    import threading

    if _state["wakeup"] is not None:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        os.close(read_fd), os.close(write_fd)
        return
    pipe = _state["wakeup"] = (read_fd, write_fd)

    def ours(signum: int) -> bool:
        """Still installed, and the signal still goes to our handler (directly, or through Lightning's
        composed handler during fit): not a test's or a caller's own handler."""
        handler = signal.getsignal(signum)
        return _state["wakeup"] is pipe and (handler is _handler or type(handler).__name__ == "_HandlersCompose")

    def watch() -> None:
        import time

        while True:
            try:
                data = os.read(read_fd, 16)
            except OSError:
                data = b""
            if not data:
                os.close(read_fd)
                return
            signum = data[-1]
            if signum not in SIGNALS or not _state["immediate"] or not ours(signum):
                continue
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and _state["immediate"] and ours(signum):
                time.sleep(0.1)
            if _state["immediate"] and ours(signum):
                _hard_stop(signum)

    threading.Thread(target=watch, name="flux-lightning-stop-watchdog", daemon=True).start()


def _hard_stop(signum: int) -> None:
    import os
    import sys
    from contextlib import suppress

    from ..atomic_files import active_temporaries

    for tmp in active_temporaries():
        with suppress(OSError):
            os.remove(tmp)
    with suppress(Exception):
        sys.stderr.write(stopped_message(StopRequested(signum)) + "\n")
        sys.stderr.flush()
    os._exit(128 + signum)


def uninstall() -> None:
    """Put the handlers that :func:`install` replaced back."""
    import os

    if _state["wakeup"] is not None:
        read_fd, write_fd = _state["wakeup"]
        _state["wakeup"] = None
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        os.close(write_fd)  # the watchdog reads EOF, closes its end and ends
    for s, previous in _state["previous"].items():
        if previous is not None:
            signal.signal(s, previous)
    _state["previous"] = {}
    _state.update(signum=None, immediate=True, collective=False)


class GracefulStop(L.Callback):
    """Stops training after the current step when a stop signal arrived, saving ``last.ckpt`` first.

    Before saving, every callback with a ``finish_step(trainer, pl_module)`` method does its work for the
    step just taken (it must be idempotent): the adapter EMA's update, which would otherwise miss the
    checkpoint of the step the run stopped at.

    ``train()`` adds it first in the callback list, so a stop at a step where validation or the
    eval loss would run skips them. The checkpoint is written in :meth:`on_exception` (whatever
    raised :class:`StopRequested`: this callback, a validation sampler step, an eval batch) by the
    run's first :class:`~lightning.pytorch.callbacks.ModelCheckpoint`, as its ``last.ckpt``.

    Attributes:
        step: the step the run stopped at; checkpoint: the resumable checkpoint (or None).
    """

    def __init__(self) -> None:
        self.started = False
        self.step: int | None = None
        self.checkpoint: str | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = True
        set_immediate(False)  # from here a signal waits for a safe point: the step is checkpointed
        _state["collective"] = trainer.world_size > 1
        if _state["collective"] and _state["previous"]:
            # Lightning's SIGTERM handler broadcasts from inside the handler: a rank that is blocked in
            # a collective then can never answer (deadlock). Ours only sets the flag; the ranks agree at
            # the end of every step (below), so a signal to any one of them stops them all.
            signal.signal(signal.SIGTERM, _handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm and requested() is None:  # Lightning's handler saw it first
            _state["signum"] = signal.SIGTERM
        if trainer.world_size > 1:
            # the signal reaches the ranks at different moments (Lightning forwards it to the ranks it
            # started); they agree at every step whether any has it, so all save and stop at the same step
            if trainer.strategy.reduce_boolean_decision(requested() is not None, all=False):
                raise StopRequested(requested() or signal.SIGTERM)
            return
        check()

    def on_train_end(self, trainer, pl_module) -> None:
        """``last.ckpt`` at the final step, also when ``max_steps`` is no multiple of the checkpoint
        interval (ModelCheckpoint then keeps the last interval's): re-running a finished run must find
        it finished, not resume a few steps early."""
        ckpt = self._model_checkpoint(trainer)
        if (
            ckpt is not None
            and ckpt.save_last
            and getattr(ckpt, "_last_global_step_saved", None) != trainer.global_step
        ):
            self.save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not self.started:  # loading, caching, restoring: nothing new to save
            return
        self.step = trainer.global_step
        if isinstance(exception, StopRequested):
            # this callback runs first: the later ones' end-of-step work for the step just taken (the
            # EMA's update) is done here, so last.ckpt holds what a periodic checkpoint would
            for cb in trainer.callbacks:
                if cb is not self and isinstance(cb, FinishStep):
                    cb.finish_step(trainer, pl_module)
            self.checkpoint = self.save(trainer)
        elif isinstance(exception, SIGTERMException):
            # Lightning stopped at the end of a step, past the point where a checkpoint resumes
            # bit-exactly: the run resumes from its last periodic checkpoint (this step's, if any)
            ckpt = self._model_checkpoint(trainer)
            self.checkpoint = (ckpt.last_model_path or ckpt.best_model_path or None) if ckpt else None

    @staticmethod
    def _model_checkpoint(trainer) -> ModelCheckpoint | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath), None)

    def save(self, trainer) -> str | None:
        """Write ``last.ckpt`` at the current step (None: nothing to save or checkpointing is off)."""
        ckpt = self._model_checkpoint(trainer)
        if ckpt is None or trainer.global_step == 0 or trainer.sanity_checking:
            return None
        path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        if ckpt.save_last:
            ckpt.last_model_path = str(path)  # part of the saved state, as when ModelCheckpoint saves it
        trainer.save_checkpoint(path, weights_only=ckpt.save_weights_only)  # as ModelCheckpoint saves
        return str(path)


def stopped_message(err: StopRequested) -> str:
    """The one line printed when a run stops on a signal."""
    name = signal.Signals(err.signum).name
    if not err.step:
        return (
            f"stopped by {name} before training started; re-run the same command to start it (finished caches are kept)"
        )
    if err.checkpoint is None:
        return (
            f"stopped by {name} at step {err.step}; no checkpoint was written (callbacks.model_checkpoint is off), "
            "so re-running starts afresh"
        )
    return f"stopped by {name} at step {err.step}; re-run the same command to resume from {err.checkpoint}"
