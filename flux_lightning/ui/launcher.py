"""Launching runs from the UI: start, queue, stop and resume ``python -m flux_lightning <overrides>``.

A run the UI launches is ``python -m flux_lightning <overrides>`` in ``workdir``, in its own session
(it survives the UI), under :mod:`supervise` (which records the training pid and the exit status),
its output in ``<state_dir>/launches/<key>.log``. A launch whose devices are busy with another
launched run waits in a queue (``<state_dir>/queue.json``) that :meth:`RunLauncher.poll` starts when
they free up. Everything is on disk (:mod:`launch_records`), so a new launcher on the same workdir
finds the running processes (by pid and start time) and the queue again. What a run is (its dir,
status, overrides) comes from the :class:`~flux_lightning.ui.runs.RunStore` the launcher is given.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ConfigError, RunDirInUse
from .forms import command_line, hydra_value, run_dir_of
from .launch_records import SUPERVISE, lock_holder, proc_start
from .runs import RunStore


class NothingToResume(RuntimeError):
    """Resume asked of a run that finished (or never started)."""


class RunLauncher:
    """Starts, queues, stops and resumes runs in ``store.workdir`` (see the module's docstring).

    Args:
        store: the runs (their dirs, statuses and the UI's launch records).
        python: the interpreter that runs ``-m flux_lightning``.
        max_cpu_runs: how many CPU launches (``devices=[]``) run at once; later ones queue
            (None: no limit).
    """

    def __init__(self, store: RunStore, *, python: str = sys.executable, max_cpu_runs: int | None = 1):
        self.store = store
        self.records = store.records
        self.workdir = store.workdir
        self.python = python
        self.max_cpu_runs = max_cpu_runs

    def _busy_devices(self, latest: dict[str, dict]) -> set:
        """The GPUs live launches use, and ``"cpu<i>"`` for each live CPU launch (``devices=[]``)."""
        busy, cpu = set(), 0
        for rec in latest.values():
            if rec.get("devices") is not None and self.records.state(rec)["alive"]:
                busy |= set(rec["devices"])
                if rec["devices"] == []:
                    busy.add(f"cpu{cpu}")
                    cpu += 1
        return busy

    def _claim(self, devices: list[int] | None, busy: set) -> set:
        """What a launch on ``devices`` needs free: its GPUs; a CPU launch, a free CPU slot
        (``max_cpu_runs`` of them; the full set when none is free)."""
        if devices is None:
            return set()
        if devices:
            return set(devices)
        if self.max_cpu_runs is None:
            return set()
        slots = [f"cpu{i}" for i in range(max(self.max_cpu_runs, 1))]
        free = [s for s in slots if s not in busy]
        return {free[0]} if free else set(slots)

    def _is_running(self, run_id: str, rec: dict | None) -> int | None:
        """The pid running ``run_id`` (its lock holder or a live launch), else None."""
        run_dir = self.store.run_dir(run_id)
        holder = lock_holder(run_dir) if run_dir.is_dir() else None
        if holder:
            return holder
        state = self.records.state(rec)
        return (state["pid"] or (rec or {}).get("supervisor_pid")) if state["alive"] else None

    def launch(
        self,
        overrides: list[str],
        *,
        devices: list[int] | None = None,
        env: dict | None = None,
        run_name: str | None = None,
    ) -> str:
        """Start ``python -m flux_lightning <overrides>`` in ``workdir`` (or queue it while any of
        ``devices`` is used by another run launched here); returns the run id.

        ``devices`` (GPU indices) become ``CUDA_VISIBLE_DEVICES``; None = no claim (the run's own
        ``trainer.devices`` decide, and it never waits). ``run_name`` adds ``run_name=<name>``.

        Raises:
            RunDirInUse: that run dir already has a running or queued run.
            ConfigError: the overrides do not compose (so the run dir is unknown).
        """
        overrides = [str(o) for o in overrides] + ([f"run_name={hydra_value(run_name)}"] if run_name else [])
        devices = None if devices is None else [int(d) for d in devices]
        try:
            run_dir, facts = run_dir_of(overrides, self.workdir)
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors
            raise ConfigError(f"the overrides do not compose: {str(err).splitlines()[0]}") from None
        run_id = self.store.id_of(run_dir)
        with self.records.changing():
            latest, queue = self.records.latest(), self.records.queue()
            if any(q["id"] == run_id for q in queue):
                raise RunDirInUse(
                    f"run {run_id} is already queued; stop it first, or give this one its own dir with run_name=<name>"
                )
            pid = self._is_running(run_id, latest.get(run_id))
            if pid:
                raise RunDirInUse(
                    f"run dir {run_dir} is in use by pid {pid}; wait for that run to end (or stop it), "
                    "or give this one its own dir with run_name=<name>"
                )
            entry = {
                "key": f"{time.time_ns()}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', run_id)}",
                "id": run_id,
                "overrides": overrides,
                "command": command_line(overrides),
                "devices": devices,
                "env": {str(k): str(v) for k, v in (env or {}).items()},
                "max_steps": facts.get("max_steps"),
                "queued_at": time.time(),
            }
            claimed = self._busy_devices(latest)
            for q in queue:  # a launch waits behind those queued before it
                claimed |= self._claim(q.get("devices"), claimed) or set()
            wanted = self._claim(devices, claimed)
            if wanted & claimed:
                queue.append(entry)
                self.records.save_queue(queue)
            else:
                self._start(entry)
            return run_id

    def _start(self, entry: dict) -> dict:
        key = entry["key"]
        log = self.records.log_path(key)
        status = self.records.status_path(key)
        args = [str(o) for o in entry["overrides"]]
        command = [
            self.python,
            "-m",
            "flux_lightning",
            *[a for a in args if a.startswith("-")],
            *[a for a in args if not a.startswith("-")],
        ]
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (entry.get("env") or {}).items()})
        if entry.get("devices") is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in entry["devices"])
        env["PYTHONUNBUFFERED"] = "1"  # a live log tail
        with open(log, "ab") as out:
            out.write(f"$ {entry['command']}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                [sys.executable, str(SUPERVISE), str(status), "--", *command],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.records.adopt(proc)
        rec = {
            **{k: v for k, v in entry.items() if k != "queued_at"},
            "log": str(log),
            "launched_at": time.time(),
            "supervisor_pid": proc.pid,
            "supervisor_start": proc_start(proc.pid),
        }
        self.records.save_launch(rec)
        return rec

    def poll(self) -> list[str]:
        """Start the queued runs whose devices are free (in queue order); returns their ids."""
        started = []
        with self.records.changing():
            latest, queue = self.records.latest(), self.records.queue()
            busy = self._busy_devices(latest)
            waiting = []
            for entry in queue:
                wanted = self._claim(entry.get("devices"), busy)
                blocked = (wanted & busy) or self._is_running(entry["id"], latest.get(entry["id"]))
                if blocked:
                    waiting.append(entry)
                    busy |= wanted  # later entries wait behind it
                    continue
                latest[entry["id"]] = self._start(entry)
                busy |= wanted
                started.append(entry["id"])
            if started or len(waiting) != len(queue):
                self.records.save_queue(waiting)
        return started

    def stop(self, run_id: str) -> dict:
        """Stop a run gracefully: SIGTERM to its training process (it writes ``last.ckpt`` at the
        current step and exits); a queued run leaves the queue. Works for CLI runs too (the pid
        holding the run dir's lock). Returns ``{"id", "pid"}`` (pid None for a queued run).

        Raises:
            ProcessLookupError: the run is not running or queued.
        """
        with self.records.changing():
            queue = self.records.queue()
            if any(q["id"] == run_id for q in queue):
                self.records.save_queue([q for q in queue if q["id"] != run_id])
                return {"id": run_id, "pid": None}
            rec = self.records.latest().get(run_id)
            pid = self._is_running(run_id, rec)
            if not pid:
                raise ProcessLookupError(f"run {run_id} is not running")
            # a pidfd pins the process: checked again through it, the signal cannot reach a successor
            pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
            try:
                if self._is_running(run_id, rec) != pid:
                    raise ProcessLookupError(f"run {run_id} is not running")
                self.records.record_stop(run_id)
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                else:  # pragma: no cover - no pidfd (not Linux)
                    os.kill(pid, signal.SIGTERM)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
            return {"id": run_id, "pid": pid}

    def resume(
        self, run_id: str, checkpoint: str | None = None, *, devices: list[int] | None = None, check=None
    ) -> str:
        """Launch the run's own overrides again: it resumes from its newest checkpoint, or from
        ``checkpoint`` (a ``.ckpt`` inside the run dir, e.g. ``checkpoints/step000500.ckpt``) via
        ``resume_from_checkpoint=<path>``. Same devices as its last launch unless given. A CLI run
        started with ``--config-dir`` is resumed with it (from ``.hydra/hydra.yaml``). ``check``
        (the server's rule on what may run) is called with the arguments before anything starts.

        Raises:
            NothingToResume: the run finished (a finished run starts no process; launch another).
        """
        run_dir = self.store.run_dir(run_id)
        with self.records.lock:
            rec = self.records.latest().get(run_id)
            summary = self.store.summary(run_id, rec, None, self.records.stops())
            if summary["status"] == "finished":
                raise NothingToResume(
                    f"run {run_id} finished (step {summary['step']}); there is nothing to resume: to train more, "
                    "launch it again with a higher trainer.max_steps, or with run_name=<new name>"
                )
            overrides = list(rec["overrides"]) if rec else self.store.cli_overrides(run_dir)
            if overrides is None:
                raise FileNotFoundError(f"run {run_id} has no .hydra/overrides.yaml; it cannot be relaunched from here")
        keep = [o for o in overrides if not re.match(r"^\+{0,2}(resume_from_checkpoint|hydra\.run\.dir)=", o)]
        keep = [o for o in keep if o.startswith("-")] + [o for o in keep if not o.startswith("-")]  # flags first
        if checkpoint:
            path = self.store.file(run_id, checkpoint)
            keep.append(f"resume_from_checkpoint={hydra_value(str(path))}")
        try:
            target, _ = run_dir_of(keep, self.workdir)
        except Exception:  # noqa: BLE001 - launch reports it
            target = None
        if target is None or Path(os.path.abspath(target)) != Path(os.path.abspath(run_dir)):
            keep.append(f"hydra.run.dir={hydra_value(os.path.relpath(run_dir, self.workdir))}")  # a sweep job's dir
        if devices is None and rec:
            devices = rec.get("devices")
        if check is not None:
            check(keep)
        return self.launch(keep, devices=devices, env=(rec or {}).get("env") or None)
