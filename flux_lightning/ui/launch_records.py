"""The UI's launches as kept on disk, and the processes they name.

Under the state dir (default ``<workdir>/outputs/.ui``): ``launches/<key>.json`` (one per launch:
run id, overrides, devices, env, log, the supervisor's pid and start time), ``launches/<key>.status.json``
(written by :mod:`supervise`: the training pid, its start time, and ``rc`` once it ended),
``launches/<key>.log``, ``queue.json`` (launches waiting for their devices) and ``stops.json`` (run id ->
when the UI stopped it). :class:`LaunchRecords` is the one reader and writer of these files, shared by
:class:`~flux_lightning.ui.runs.RunStore` (which reads them) and
:class:`~flux_lightning.ui.launcher.RunLauncher` (which writes them). A recorded pid counts only while
it is the process that was recorded (start time and command line from /proc).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..run.rundir import LOCK_NAME

SUPERVISE = Path(__file__).with_name("supervise.py")


# -- processes ------------------------------------------------------------------------------------
def proc_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot) from /proc, to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def _cmdline(pid: int) -> str:
    """The process's command line (arguments joined by spaces), '' when it cannot be read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def lock_holder(run_dir: str | os.PathLike) -> int | None:
    """The pid of the process holding ``<run_dir>/.lock`` (a running run), or None. Uses ``F_GETLK``:
    the lock is only tested, never taken, so a run starting meanwhile is never refused."""
    path = Path(run_dir) / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no POSIX locks
        return None
    if not sys.platform.startswith("linux"):  # struct flock's layout differs: the pid RunDirLock wrote, if alive
        return _written_pid(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        query += b"\0" * (32 - len(query))
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        kind, _, _, _, pid = struct.unpack("hhqqi", answer[: struct.calcsize("hhqqi")])
        return pid if kind != fcntl.F_UNLCK and pid > 0 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _written_pid(path: Path) -> int | None:  # pragma: no cover - non-Linux fallback
    try:
        pid = int(path.read_text().strip() or 0)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid or None


def read_json(path: Path, default):
    """The JSON in ``path``, or ``default`` when it is missing or unreadable (being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_json(path: Path, data) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class LaunchRecords:
    """The launch records, queue and stops under ``state_dir``, and the liveness of the processes
    they name (see the module's docstring).

    Attributes:
        state_dir / launch_dir: the state dir and its ``launches/`` folder (created).
        lock: this process's lock around every read or change of the records (an ``RLock``).
    """

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir).resolve()
        self.launch_dir = self.state_dir / "launches"
        self.launch_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._children: dict[int, subprocess.Popen] = {}

    @contextmanager
    def changing(self):
        """This process's lock and a file lock on the state dir (two UIs on one workdir)."""
        import fcntl

        with self.lock:
            fd = os.open(self.state_dir / "store.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # -- the files ------------------------------------------------------------------------------
    def queue(self) -> list[dict]:
        return read_json(self.state_dir / "queue.json", [])

    def save_queue(self, queue: list[dict]) -> None:
        write_json(self.state_dir / "queue.json", queue)

    def stops(self) -> dict:
        """run id -> when the UI last stopped it (``time.time()``)."""
        return read_json(self.state_dir / "stops.json", {})

    def record_stop(self, run_id: str) -> None:
        stops = self.stops()
        stops[run_id] = time.time()
        write_json(self.state_dir / "stops.json", stops)

    def every_launch(self) -> list[dict]:
        """Every launch record, in file name order."""
        out = []
        for path in sorted(self.launch_dir.glob("*.json")):
            if path.name.endswith(".status.json"):
                continue
            rec = read_json(path, None)
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
        return out

    def latest(self) -> dict[str, dict]:
        """run id -> its latest launch record."""
        latest: dict[str, dict] = {}
        for rec in self.every_launch():
            if rec["id"] not in latest or rec.get("launched_at", 0) >= latest[rec["id"]].get("launched_at", 0):
                latest[rec["id"]] = rec
        return latest

    def launch(self, key: str) -> dict | None:
        """The launch record with ``key`` (a checked key: a file name under ``launches/``), or None."""
        rec = read_json(self.launch_dir / f"{key}.json", None)
        return rec if isinstance(rec, dict) else None

    def save_launch(self, rec: dict) -> None:
        write_json(self.launch_dir / f"{rec['key']}.json", rec)

    def status(self, key: str) -> dict:
        """What :mod:`supervise` wrote of the launch ``key`` (``{}`` before it started)."""
        return read_json(self.status_path(key), {})

    def status_path(self, key: str) -> Path:
        return self.launch_dir / f"{key}.status.json"

    def log_path(self, key: str) -> Path:
        return self.launch_dir / f"{key}.log"

    # -- processes ------------------------------------------------------------------------------
    def adopt(self, proc: subprocess.Popen) -> None:
        """A process this object's owner started: polled (not reaped behind Popen's back)."""
        self._children[proc.pid] = proc

    def alive(self, pid: int | None, start: int | None = None, command: str | None = None) -> bool:
        """Whether ``pid`` is the process that was recorded: alive, started at ``start`` (/proc ticks)
        and, when given, with ``command`` in its command line. A pid reused after a reboot or an OOM
        kill fails the check, so it is never reported running, nor signalled."""
        if not pid:
            return False
        child = self._children.get(pid)
        if child is not None:
            if child.poll() is not None:
                return False
        else:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)  # reap a child of an earlier launcher in this process
                if done == pid:
                    return False
            except ChildProcessError:
                pass
        if Path("/proc").is_dir():
            now = proc_start(pid)
            if now is None or (start is not None and now != start):
                return False
            return command is None or command in _cmdline(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def state(self, rec: dict | None) -> dict:
        """``{"alive", "pid" (the training process), "rc"}`` of a launch."""
        if rec is None:
            return {"alive": False, "pid": None, "rc": None}
        status = self.status(rec["key"])
        if "rc" in status:
            return {"alive": False, "pid": status.get("pid"), "rc": status["rc"]}
        pid = status.get("pid")
        training = pid is not None and self.alive(pid, status.get("start"), "flux_lightning")
        supervisor = self.alive(rec.get("supervisor_pid"), rec.get("supervisor_start"), SUPERVISE.name)
        # the pid to signal: the training process, else its supervisor (which forwards the signal)
        return {
            "alive": training or supervisor,
            "pid": pid if training else rec.get("supervisor_pid") if supervisor else None,
            "rc": None,
        }
