"""The runs the UI shows: every run dir under ``<workdir>/outputs``, launched from the UI or the CLI.

The UI reads run dirs, it does not own them (docs/architecture.md, "Run dirs, resume, one process
per dir"): a run is running while a process holds its ``.lock`` (``lockf``; tested with ``F_GETLK``,
which never takes the lock, and which names the holder's pid), finished when ``result.json`` is
there. A run the UI launches is ``python -m flux_lightning <overrides>`` in ``workdir``, in its own
session (it survives the UI), under :mod:`supervise` (which records the training pid and the exit
status), its output in ``<state_dir>/launches/<key>.log``. A launch whose devices are busy with
another launched run waits in a queue (``<state_dir>/queue.json``) that :meth:`RunStore.poll`
starts when they free up. Everything is on disk, so a new ``RunStore`` on the same workdir finds
the running processes (by pid and start time) and the queue again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ..adapters.config import ADAPTER_FILENAME
from ..errors import ConfigError, RunDirInUse
from ..run.resume import RESULT_FILE, checkpoint_step
from ..run.rundir import LOCK_NAME
from .forms import command_line, hydra_value, run_dir_of
from .run_files import data_file, finite_or_none, inside, log_tail, mtime, mtime_or0, newest, read_csv_metrics

SUPERVISE = Path(__file__).with_name("supervise.py")
STATUSES = ("queued", "running", "finished", "failed", "stopped", "interrupted")
STOP_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
_MARKERS = (".hydra", LOCK_NAME, "checkpoints", RESULT_FILE)


# -- processes ------------------------------------------------------------------------------------
def _proc_start(pid: int) -> int | None:
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


class NothingToResume(RuntimeError):
    """Resume asked of a run that finished (or never started)."""


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


class RunStore:
    """Run dirs under ``<workdir>/outputs`` (UI- and CLI-launched alike), the UI's launches and queue.

    Args:
        workdir: the launch dir (runs are ``<workdir>/outputs/runs/<run_name>``, sweeps
            ``<workdir>/outputs/multirun/...``).
        python: the interpreter that runs ``-m flux_lightning``.
        state_dir: where launches (pid, overrides, devices, log) and the queue are kept; default
            ``<workdir>/outputs/.ui``.
        max_cpu_runs: how many CPU launches (``devices=[]``) run at once; later ones queue
            (None: no limit).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        python: str = sys.executable,
        state_dir: str | os.PathLike | None = None,
        max_cpu_runs: int | None = 1,
    ):
        self.max_cpu_runs = max_cpu_runs
        self.workdir = Path(workdir).resolve()
        self.outputs = self.workdir / "outputs"
        self.python = python
        self.state_dir = Path(state_dir).resolve() if state_dir else self.outputs / ".ui"
        self.launch_dir = self.state_dir / "launches"
        self.launch_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._children: dict[int, subprocess.Popen] = {}
        self._cache: dict[tuple, tuple] = {}
        self._accumulators: dict[str, object] = {}

    # -- state on disk --------------------------------------------------------------------------
    @contextmanager
    def _state(self):
        """This process's lock and a file lock on the state dir (two UIs on one workdir)."""
        import fcntl

        with self._lock:
            fd = os.open(self.state_dir / "store.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _read_json(self, path: Path, default):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return default

    def _write_json(self, path: Path, data) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def _queue(self) -> list[dict]:
        return self._read_json(self.state_dir / "queue.json", [])

    def _save_queue(self, queue: list[dict]) -> None:
        self._write_json(self.state_dir / "queue.json", queue)

    def _stops(self) -> dict:
        return self._read_json(self.state_dir / "stops.json", {})

    def _records(self) -> dict[str, dict]:
        """run id -> its latest launch record."""
        latest: dict[str, dict] = {}
        for path in sorted(self.launch_dir.glob("*.json")):
            if path.name.endswith(".status.json"):
                continue
            rec = self._read_json(path, None)
            if isinstance(rec, dict) and "id" in rec:
                if rec["id"] not in latest or rec.get("launched_at", 0) >= latest[rec["id"]].get("launched_at", 0):
                    latest[rec["id"]] = rec
        return latest

    # -- processes ------------------------------------------------------------------------------
    def _alive(self, pid: int | None, start: int | None = None, command: str | None = None) -> bool:
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
                done, _ = os.waitpid(pid, os.WNOHANG)  # reap a child of an earlier store in this process
                if done == pid:
                    return False
            except ChildProcessError:
                pass
        if Path("/proc").is_dir():
            now = _proc_start(pid)
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

    def _launch_state(self, rec: dict | None) -> dict:
        """``{"alive", "pid" (the training process), "rc"}`` of a launch."""
        if rec is None:
            return {"alive": False, "pid": None, "rc": None}
        status = self._read_json(self.launch_dir / f"{rec['key']}.status.json", {})
        if "rc" in status:
            return {"alive": False, "pid": status.get("pid"), "rc": status["rc"]}
        pid = status.get("pid")
        training = pid is not None and self._alive(pid, status.get("start"), "flux_lightning")
        supervisor = self._alive(rec.get("supervisor_pid"), rec.get("supervisor_start"), SUPERVISE.name)
        # the pid to signal: the training process, else its supervisor (which forwards the signal)
        return {
            "alive": training or supervisor,
            "pid": pid if training else rec.get("supervisor_pid") if supervisor else None,
            "rc": None,
        }

    # -- run dirs -------------------------------------------------------------------------------
    def _run_dir(self, run_id: str) -> Path:
        text = str(run_id).strip("/")
        rel = PurePosixPath(text)
        if not text or rel.is_absolute() or ".." in rel.parts or rel.parts[0].startswith("."):
            raise PermissionError(f"not a run id: {run_id!r}")
        path = self.outputs / rel
        if not path.resolve().is_relative_to(self.outputs.resolve()):
            raise PermissionError(f"run {run_id!r} leads outside {self.outputs}")
        return path

    def _id_of(self, run_dir: Path) -> str:
        run_dir = Path(run_dir).resolve() if Path(run_dir).exists() else Path(os.path.abspath(run_dir))
        outputs = self.outputs.resolve() if self.outputs.exists() else self.outputs
        if not run_dir.is_relative_to(outputs) or run_dir == outputs:
            raise ValueError(
                f"run dir {run_dir} is outside {self.outputs}; the UI lists runs under outputs/ only "
                "(leave hydra.run.dir at its default, or use run_name=<name>)"
            )
        return run_dir.relative_to(outputs).as_posix()

    def _found_dirs(self) -> list[Path]:
        """Every run dir under ``outputs/`` (a dir with ``.hydra``, ``.lock``, ``checkpoints`` or
        ``result.json``); the state dir and the insides of run dirs are not searched."""
        found = []
        if not self.outputs.is_dir():
            return found
        for dirpath, dirs, files in os.walk(self.outputs):
            here = Path(dirpath)
            if here == self.state_dir:
                dirs[:] = []
                continue
            if here != self.outputs and any(m in dirs or m in files for m in _MARKERS):
                found.append(here)
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and len(here.relative_to(self.outputs).parts) < 5)
        return found

    def _cached(self, kind: str, path: Path, compute):
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        key = (kind, str(path))
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = compute() if stamp is not None else None
        self._cache[key] = (stamp, value)
        return value

    def _config_facts(self, run_dir: Path) -> dict:
        def read():
            from omegaconf import OmegaConf

            try:
                trainer = OmegaConf.load(run_dir / ".hydra" / "config.yaml").get("trainer") or {}
                out = {}
                for k in ("max_steps", "devices"):
                    try:
                        v = trainer.get(k)
                        out[k] = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
                    except Exception:  # noqa: BLE001 - an interpolation
                        out[k] = None
                return out
            except Exception:  # noqa: BLE001
                return {}

        return self._cached("config", run_dir / ".hydra" / "config.yaml", read) or {}

    def _cli_overrides(self, run_dir: Path) -> list[str] | None:
        def read():
            from omegaconf import OmegaConf

            try:
                overrides = [
                    str(o) for o in OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
                ]
            except Exception:  # noqa: BLE001
                return None
            return [f"--config-dir={d}" for d in self._cli_config_dirs(run_dir)] + overrides

        return self._cached("overrides", run_dir / ".hydra" / "overrides.yaml", read)

    @staticmethod
    def _cli_config_dirs(run_dir: Path) -> list[str]:
        """The ``--config-dir`` a CLI run was started with (Hydra records it in ``.hydra/hydra.yaml``
        as a config source of the ``command-line`` provider)."""
        import yaml

        try:
            hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
            sources = hydra["runtime"]["config_sources"]
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            return []
        return [
            str(s["path"])
            for s in sources
            if isinstance(s, dict) and s.get("provider") == "command-line" and s.get("schema") == "file"
        ]

    def _result(self, run_dir: Path) -> dict | None:
        return self._cached("result", run_dir / RESULT_FILE, lambda: self._read_json(run_dir / RESULT_FILE, {}))

    def _checkpoints(self, run_dir: Path) -> list[dict]:
        out = []
        for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):

            def read(path=path):
                try:
                    return {"step": checkpoint_step(path), "error": None}
                except (ValueError, OSError) as err:
                    return {"step": None, "error": str(err)}

            info = self._cached("ckpt", path, read) or {"step": None, "error": "missing"}
            out.append({"file": path.relative_to(run_dir).as_posix(), **info})
        out.sort(key=lambda c: (c["step"] is None, c["step"] or 0, c["file"] != "checkpoints/last.ckpt"))
        return out

    # -- metrics --------------------------------------------------------------------------------
    def _metrics(self, run_dir: Path) -> dict[str, list]:
        series: dict[str, list] = {}
        for path in sorted((run_dir / "csv").glob("**/metrics.csv")):
            for tag, points in (self._cached("csv", path, lambda p=path: read_csv_metrics(p)) or {}).items():
                series.setdefault(tag, points)
        for folder in sorted({p.parent for p in (run_dir / "tensorboard").glob("**/events.out.tfevents.*")}):
            for tag, points in self._tensorboard(folder).items():
                series[tag] = points
        series.pop("hp_metric", None)
        for tag in ("loss/train", "loss/val", "clip/mean"):
            series.setdefault(tag, [])
        return series

    def _tensorboard(self, folder: Path) -> dict[str, list]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = self._accumulators.get(str(folder))
        if acc is None:
            acc = EventAccumulator(
                str(folder), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1}
            )
            self._accumulators[str(folder)] = acc
        try:
            acc.Reload()
            return {
                tag: [[e.step, finite_or_none(e.value)] for e in acc.Scalars(tag)]
                for tag in acc.Tags().get("scalars", [])
            }
        except Exception:  # noqa: BLE001 - a file being written, or corrupt
            return {}

    def _images(self, run_dir: Path) -> list[dict]:
        out = []
        for folder in (run_dir / "validation").glob("step_*"):
            m = re.fullmatch(r"step_(\d+)", folder.name)
            if not m or not folder.is_dir():
                continue
            files = sorted(
                p.relative_to(run_dir).as_posix() for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
            )
            if files:
                out.append({"step": int(m.group(1)), "files": files})
        return sorted(out, key=lambda e: e["step"])

    # -- the listing ----------------------------------------------------------------------------
    def _summary(self, run_id: str, rec: dict | None, queued: dict | None, stops: dict) -> dict:
        run_dir = self._run_dir(run_id)
        facts = self._config_facts(run_dir) if run_dir.is_dir() else {}
        info = {
            "id": run_id,
            "name": run_dir.name,
            "dir": str(run_dir),
            "source": "ui" if (rec or queued) else "cli",
            "devices": (queued or rec or {}).get("devices") if (queued or rec) else facts.get("devices"),
            "max_steps": facts.get("max_steps", (queued or rec or {}).get("max_steps")),
            "pid": None,
            "exit_code": None,
        }
        if queued is not None:
            info.update(status="queued", step=0, queued_at=queued.get("queued_at"))
            return info
        state = self._launch_state(rec)
        holder = lock_holder(run_dir) if run_dir.is_dir() else None
        result = self._result(run_dir) if run_dir.is_dir() else None
        result_time = mtime(run_dir / RESULT_FILE)
        info["exit_code"] = state["rc"]
        if holder or state["alive"]:
            status = "running"
            info["pid"] = holder or state["pid"] or (rec or {}).get("supervisor_pid")
        elif (
            rec is not None
            and state["rc"] is not None
            and (result_time is None or rec.get("launched_at", 0) >= result_time - 1 or state["rc"] == 0)
        ):
            rc = state["rc"]  # how the last launch ended, unless a later CLI run wrote result.json
            status = "finished" if rc == 0 else "stopped" if rc in STOP_CODES else "failed"
        elif result:
            status = "finished"
        elif stops.get(run_id, 0) > max((rec or {}).get("launched_at", 0), 0):
            status = "stopped"
        else:
            status = "interrupted"
        steps = [c["step"] for c in self._checkpoints(run_dir) if c["step"] is not None] if run_dir.is_dir() else []
        if result and isinstance(result.get("steps"), int):
            steps.append(result["steps"])
        if status == "running" and run_dir.is_dir():
            train = self._metrics(run_dir).get("loss/train") or []
            if train:
                steps.append(int(train[-1][0]) + 1)  # logged at the step's index, before it counts
        info.update(status=status, step=max(steps) if steps else 0)
        return info

    def runs(self) -> list[dict]:
        """Every run: ``{"id", "name", "dir", "status", "step", "max_steps", "source", "devices", ...}``,
        newest first (queued runs, which have no dir yet, appear with their future id)."""
        with self._lock:
            records, queue, stops = self._records(), self._queue(), self._stops()
            ids = {self._id_of(d) for d in self._found_dirs()}
            ids |= set(records) | {q["id"] for q in queue}
            queued = {q["id"]: q for q in queue}
            out = [self._summary(i, records.get(i), queued.get(i), stops) for i in ids]
            order = {q["id"]: n for n, q in enumerate(queue)}
            out.sort(
                key=lambda r: (
                    r["status"] != "running",
                    r["status"] != "queued",
                    order.get(r["id"], 0),
                    -mtime_or0(Path(r["dir"])),
                )
            )
            return out

    def run(self, run_id: str) -> dict:
        """One run in detail: the listing's fields plus ``command``, ``log_tail``, ``metrics``
        (tag -> ``[[step, value], ...]``), ``images`` (by step), ``checkpoints`` and ``lora``.

        Raises:
            KeyError: no such run.
        """
        with self._lock:
            records, queue = self._records(), self._queue()
            queued = next((q for q in queue if q["id"] == run_id), None)
            rec = records.get(run_id)
            run_dir = self._run_dir(run_id)
            if rec is None and queued is None and not run_dir.is_dir():
                raise KeyError(f"no run {run_id} under {self.outputs}")
            info = self._summary(run_id, rec, queued, self._stops())
            source = queued or rec
            overrides = source["overrides"] if source else (self._cli_overrides(run_dir) or [])
            info["overrides"] = overrides
            info["command"] = command_line(overrides)
            log = (
                Path(rec["log"])
                if rec and rec.get("log")
                else newest(run_dir.glob("*.log"))
                if run_dir.is_dir()
                else None
            )
            info["log"] = str(log) if log else None
            info["log_tail"] = log_tail(log) if log else ""
            exists = run_dir.is_dir()
            info["metrics"] = self._metrics(run_dir) if exists else {"loss/train": [], "loss/val": [], "clip/mean": []}
            info["images"] = self._images(run_dir) if exists else []
            info["checkpoints"] = self._checkpoints(run_dir) if exists else []
            lora = run_dir / "lora" / ADAPTER_FILENAME
            info["lora"] = f"lora/{ADAPTER_FILENAME}" if lora.is_file() else None
            info["result"] = self._result(run_dir) if exists else None
            info["lora_step"] = self._lora_step(run_dir, info["checkpoints"], info["result"]) if info["lora"] else None
            info["attempts"] = self._attempts(run_id, run_dir)
            return info

    def _attempts(self, run_id: str, run_dir: Path) -> list[dict]:
        """Every launch of the run from the UI, oldest first (each keeps its own log), after the run
        dir's own log when there is one (``run-dir``: Hydra's ``<job>.log``, appended to by every
        attempt, the CLI's included): ``[{"key", "label", "launched_at", "command", "rc", "log"}]``."""
        out = []
        own = newest(run_dir.glob("*.log")) if run_dir.is_dir() else None
        for path in sorted(self.launch_dir.glob("*.json")):
            if path.name.endswith(".status.json"):
                continue
            rec = self._read_json(path, None)
            if isinstance(rec, dict) and rec.get("id") == run_id:
                status = self._read_json(self.launch_dir / f"{rec['key']}.status.json", {})
                out.append(
                    {
                        "key": rec["key"],
                        "launched_at": rec.get("launched_at"),
                        "command": rec.get("command"),
                        "rc": status.get("rc"),
                        "log": bool(rec.get("log")) and Path(rec["log"]).is_file(),
                    }
                )
        out.sort(key=lambda a: a["launched_at"] or 0)
        for n, attempt in enumerate(out, 1):
            attempt["label"] = f"launch {n} from the UI" + ("" if attempt["rc"] is None else f" (exit {attempt['rc']})")
        if own is not None:
            out.insert(
                0,
                {
                    "key": "run-dir",
                    "label": f"{own.name}: every attempt, the CLI's too",
                    "launched_at": None,
                    "command": None,
                    "rc": None,
                    "log": True,
                },
            )
        return out

    def attempt_log(self, run_id: str, key: str) -> Path:
        """The log file of one launch of ``run_id`` (by its key, from :meth:`run`'s ``attempts``).

        Raises:
            FileNotFoundError: no such launch of that run, or it has no log.
        """
        if key == "run-dir":
            run_dir = self._run_dir(run_id)
            own = newest(run_dir.glob("*.log")) if run_dir.is_dir() else None
            if own is None:
                raise FileNotFoundError(f"run {run_id} has no log of its own")
            return own
        if not re.fullmatch(r"[A-Za-z0-9_.=,+-]+", str(key)):
            raise FileNotFoundError(f"no attempt {key!r} of run {run_id}")
        rec = self._read_json(self.launch_dir / f"{key}.json", None)
        if not isinstance(rec, dict) or rec.get("id") != run_id or not rec.get("log") or not Path(rec["log"]).is_file():
            raise FileNotFoundError(f"no attempt {key!r} of run {run_id}")
        return Path(rec["log"])

    @staticmethod
    def _lora_step(run_dir: Path, checkpoints: list[dict], result: dict | None) -> int | None:
        """The step the exported LoRA holds: it is written with each checkpoint (just before the
        checkpoint file) and at the end of training, so the first checkpoint written after it has
        its step; none after it: the run's final step (result.json), else the newest checkpoint's."""
        written = mtime(run_dir / "lora" / ADAPTER_FILENAME)
        if written is None:
            return None
        later = [(mtime(run_dir / c["file"]) or 0, c["step"]) for c in checkpoints if c["step"] is not None]
        after = sorted((t, step) for t, step in later if t >= written - 0.001)
        if after:
            return after[0][1]
        if result and isinstance(result.get("steps"), int):
            return result["steps"]
        return max((step for _, step in later), default=None)

    def file(self, run_id: str, relpath: str) -> Path:
        """A file of a run (image, checkpoint, LoRA, log), resolved inside its run dir.

        Raises:
            PermissionError: the path leads outside the run dir (``..``, absolute, a symlink out).
            FileNotFoundError: no such file.
        """
        run_dir = self._run_dir(run_id)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"no run {run_id}")
        return inside(run_dir, relpath)

    data_file = staticmethod(data_file)

    # -- launching ------------------------------------------------------------------------------
    def _busy_devices(self, records: dict[str, dict]) -> set:
        """The GPUs live launches use, and ``"cpu<i>"`` for each live CPU launch (``devices=[]``)."""
        busy, cpu = set(), 0
        for rec in records.values():
            if rec.get("devices") is not None and self._launch_state(rec)["alive"]:
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
        run_dir = self._run_dir(run_id)
        holder = lock_holder(run_dir) if run_dir.is_dir() else None
        if holder:
            return holder
        state = self._launch_state(rec)
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
        run_id = self._id_of(run_dir)
        with self._state():
            records, queue = self._records(), self._queue()
            if any(q["id"] == run_id for q in queue):
                raise RunDirInUse(
                    f"run {run_id} is already queued; stop it first, or give this one its own dir with run_name=<name>"
                )
            pid = self._is_running(run_id, records.get(run_id))
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
            claimed = self._busy_devices(records)
            for q in queue:  # a launch waits behind those queued before it
                claimed |= self._claim(q.get("devices"), claimed) or set()
            wanted = self._claim(devices, claimed)
            if wanted & claimed:
                queue.append(entry)
                self._save_queue(queue)
            else:
                self._start(entry)
            return run_id

    def _start(self, entry: dict) -> dict:
        key = entry["key"]
        log = self.launch_dir / f"{key}.log"
        status = self.launch_dir / f"{key}.status.json"
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
        self._children[proc.pid] = proc
        rec = {
            **{k: v for k, v in entry.items() if k != "queued_at"},
            "log": str(log),
            "launched_at": time.time(),
            "supervisor_pid": proc.pid,
            "supervisor_start": _proc_start(proc.pid),
        }
        self._write_json(self.launch_dir / f"{key}.json", rec)
        return rec

    def poll(self) -> list[str]:
        """Start the queued runs whose devices are free (in queue order); returns their ids."""
        started = []
        with self._state():
            records, queue = self._records(), self._queue()
            busy = self._busy_devices(records)
            waiting = []
            for entry in queue:
                wanted = self._claim(entry.get("devices"), busy)
                blocked = (wanted & busy) or self._is_running(entry["id"], records.get(entry["id"]))
                if blocked:
                    waiting.append(entry)
                    busy |= wanted  # later entries wait behind it
                    continue
                records[entry["id"]] = self._start(entry)
                busy |= wanted
                started.append(entry["id"])
            if started or len(waiting) != len(queue):
                self._save_queue(waiting)
        return started

    def stop(self, run_id: str) -> dict:
        """Stop a run gracefully: SIGTERM to its training process (it writes ``last.ckpt`` at the
        current step and exits); a queued run leaves the queue. Works for CLI runs too (the pid
        holding the run dir's lock). Returns ``{"id", "pid"}`` (pid None for a queued run).

        Raises:
            ProcessLookupError: the run is not running or queued.
        """
        with self._state():
            queue = self._queue()
            if any(q["id"] == run_id for q in queue):
                self._save_queue([q for q in queue if q["id"] != run_id])
                return {"id": run_id, "pid": None}
            rec = self._records().get(run_id)
            pid = self._is_running(run_id, rec)
            if not pid:
                raise ProcessLookupError(f"run {run_id} is not running")
            # a pidfd pins the process: checked again through it, the signal cannot reach a successor
            pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
            try:
                if self._is_running(run_id, rec) != pid:
                    raise ProcessLookupError(f"run {run_id} is not running")
                stops = self._stops()
                stops[run_id] = time.time()
                self._write_json(self.state_dir / "stops.json", stops)
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
        run_dir = self._run_dir(run_id)
        with self._lock:
            records = self._records()
            rec = records.get(run_id)
            summary = self._summary(run_id, rec, None, self._stops())
            if summary["status"] == "finished":
                raise NothingToResume(
                    f"run {run_id} finished (step {summary['step']}); there is nothing to resume: to train more, "
                    "launch it again with a higher trainer.max_steps, or with run_name=<new name>"
                )
            overrides = list(rec["overrides"]) if rec else self._cli_overrides(run_dir)
            if overrides is None:
                raise FileNotFoundError(f"run {run_id} has no .hydra/overrides.yaml; it cannot be relaunched from here")
        keep = [o for o in overrides if not re.match(r"^\+{0,2}(resume_from_checkpoint|hydra\.run\.dir)=", o)]
        keep = [o for o in keep if o.startswith("-")] + [o for o in keep if not o.startswith("-")]  # flags first
        if checkpoint:
            path = self.file(run_id, checkpoint)
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
