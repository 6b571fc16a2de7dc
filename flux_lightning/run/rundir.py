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

from ..errors import RunDirInUse

LOCK_NAME = ".lock"


def default_run_name(*, _root_=None) -> str:
    """The experiment's name (``+experiment=krea_lora`` -> ``krea_lora``); ``demo`` for the embedded
    default (tiny flavour on demo data); else ``<model>_<dataset>`` from the group choices.

    The choices are read from the config being resolved when it has its ``hydra`` node: a sweep's
    own config (``hydra.sweep.dir``, resolved by the sweeper and by the end-of-sweep summary before
    any job sets ``HydraConfig``) names the same dir as its jobs; a job's config has lost that node
    and reads ``HydraConfig``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    choices = OmegaConf.select(_root_, "hydra.runtime.choices") if _root_ is not None else None
    if choices is None:
        if not HydraConfig.initialized():
            return "run"
        choices = HydraConfig.get().runtime.choices
    experiment = choices.get("experiment")
    if experiment:
        return str(experiment).replace("/", "_")
    model, dataset = choices.get("model"), choices.get("dataset")
    return "demo" if (model, dataset) == ("tiny", "demo") else f"{model}_{dataset}"


def wandb_run_id(run_dir: str) -> str:
    """A W&B run id that is the same whenever this run dir is trained again (a resume continues its
    curves, with ``resume: allow``) and differs between dirs: ``<dir name>-<8 hex of its absolute path>``
    (a sweep's jobs are dirs ``0``, ``1``, ... and get their sweep's name in front)."""
    import hashlib
    import re

    path = Path(run_dir).resolve()
    name = f"{path.parent.name}-{path.name}" if path.name.isdigit() else path.name
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:48]}-{digest}"


def launcher_rank() -> int | None:
    """This process's global rank as an external launcher set it, read before any trainer exists,
    with Lightning's own cluster environments in the order its Trainer tries them (torchelastic /
    torchrun, SLURM incl. submitit's tasks, LSF, MPI); None when none of them launched it (a plain
    run, or Lightning's DDP, whose children carry LOCAL_RANK / NODE_RANK: :func:`is_global_zero`)."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env.detect():
            if env is SLURMEnvironment:  # its constructor refuses settings that the Trainer reports itself
                return int(os.environ["SLURM_PROCID"])
            return int(env().global_rank())
    return None


def is_global_zero() -> bool:
    """Whether this process is global rank 0 of its run (the one that locks the run dir and writes
    the run-level files): an external launcher's rank 0, or Lightning's launching process (its DDP
    children have LOCAL_RANK / NODE_RANK (or torchelastic's GROUP_RANK) != 0)."""
    rank = launcher_rank()
    if rank is not None:
        return rank == 0
    from lightning.fabric.plugins.environments import LightningEnvironment

    env = LightningEnvironment()
    return env.local_rank() == 0 and env.node_rank() == 0


def acquire(run_dir: str | Path) -> int | None:
    """Lock ``run_dir`` for this process (released when it exits, even by SIGKILL); returns the fd.

    Raises:
        RunDirInUse: another live process holds it (the message names its pid and the fix).
    """
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): no protection
        return None
    if not is_global_zero():  # every other rank shares rank 0's dir and trains
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


MULTIRUN_DDP_WARNING = (
    "Hydra multirun with DDP started by Lightning: this child rank re-runs the whole sweep command "
    "(Lightning's known limitation); launch one job per torchrun/srun, or use hydra/launcher=submitit_slurm "
    "(README: multi-GPU)"
)


def _as_other_rank(config, rank: int) -> None:
    """What Lightning does for the DDP children it starts itself (``hydra.output_subdir=null``,
    ``hydra.job.name=train_ddp_process_<k>``), for a rank started by an external launcher: it does not
    write ``.hydra/`` and logs to ``train_rank<k>.log`` in rank 0's run dir."""
    from omegaconf import open_dict, read_write

    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
        config.hydra.job.name = f"train_rank{rank}"


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
                file=sys.stderr,
                flush=True,
            )
            sys.exit(2)
        if fd is not None:
            self.fds.append(fd)

    def on_run_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # so ${hydra:...} and run_name resolve here
        rank = launcher_rank()
        if rank:  # a torchrun / srun / submitit task other than rank 0: train in rank 0's dir, write nothing there
            _as_other_rank(config, rank)
        self._lock(str(config.hydra.run.dir))

    def on_multirun_start(self, config, **kwargs) -> None:
        if launcher_rank() is None and not is_global_zero():
            print(f"warning: {MULTIRUN_DDP_WARNING}", file=sys.stderr, flush=True)  # before Hydra's logging

    def on_job_start(self, config, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            self._lock(str(config.hydra.runtime.output_dir))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN and self.fds:
            os.close(self.fds.pop())
