"""The run dir: a stable name per run (so re-running a command resumes it), held by one process.

``hydra.run.dir`` is ``outputs/runs/${run_name}``; ``run_name`` defaults to the experiment's name
(:func:`default_run_name`). :class:`RunDirLock` (a Hydra callback) takes an exclusive POSIX record
lock (``lockf``) on ``<run dir>/.lock`` before Hydra writes anything there, so a second process on
the same dir is refused with the holder's pid instead of interleaving checkpoints with it. A record
lock belongs to its process alone: forked dataloader workers do not inherit it, so the orphaned
workers of a killed run never keep its dir locked (an ``flock`` would be shared with them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from .errors import RunDirInUse

LOCK_NAME = ".lock"


def default_run_name() -> str:
    """The experiment's name (``+experiment=krea_lora`` -> ``krea_lora``); ``demo`` for the embedded
    default (tiny flavour on demo data); else ``<model>_<dataset>`` from the group choices."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "run"
    choices = HydraConfig.get().runtime.choices
    experiment = choices.get("experiment")
    if experiment:
        return str(experiment).replace("/", "_")
    model, dataset = choices.get("model"), choices.get("dataset")
    return "demo" if (model, dataset) == ("tiny", "demo") else f"{model}_{dataset}"


def _is_launcher_child() -> bool:
    """DDP ranks started by Lightning re-run the command in rank 0's run dir: they share its lock."""
    return any(int(os.environ.get(v, "0") or 0) != 0 for v in ("LOCAL_RANK", "NODE_RANK"))


def acquire(run_dir: str | Path) -> int | None:
    """Lock ``run_dir`` for this process (released when it exits, even by SIGKILL); returns the fd.

    Raises:
        RunDirInUse: another live process holds it (the message names its pid and the fix).
    """
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): no protection
        return None
    if _is_launcher_child():
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirInUse(
            f"run dir {run_dir} is in use by pid {holder}; wait for that run to end (or stop it), "
            "or give this one its own dir with run_name=<name>"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class RunDirLock(Callback):
    """Hydra callback: lock the run dir (single run) or the job dir (multirun) for this process."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def _lock(self, run_dir: str) -> None:
        try:
            fd = acquire(run_dir)
        except RunDirInUse as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except OSError as err:  # read-only, not permitted, full: before Hydra writes its files there
            print(
                f"error: cannot write to run dir {run_dir} ({err.strerror or err}); make it writable, or "
                "give this run another dir with run_name=<name> (or hydra.run.dir=<path>)",
                file=sys.stderr, flush=True,
            )
            sys.exit(2)
        if fd is not None:
            self.fds.append(fd)

    def on_run_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # so ${hydra:...} and run_name resolve here
        self._lock(str(config.hydra.run.dir))

    def on_job_start(self, config, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            self._lock(str(config.hydra.runtime.output_dir))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN and self.fds:
            os.close(self.fds.pop())
