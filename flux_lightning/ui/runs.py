"""The runs the UI shows: every run dir under ``<workdir>/outputs``, launched from the UI or the CLI.

The UI reads run dirs, it does not own them (docs/architecture.md, "Run dirs, resume, one process
per dir"): a run is running while a process holds its ``.lock`` (``lockf``; tested with ``F_GETLK``,
which never takes the lock, and which names the holder's pid), finished when ``result.json`` is
there. The UI's own launches (:mod:`launcher`) add what a run dir cannot say: a run queued for its
devices, a launch still starting, how a launch ended, a stop asked for (:mod:`launch_records`).
:class:`RunStore` only reads: listing, one run's details, its attempts and logs, files, metrics,
images and checkpoints.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path, PurePosixPath

from ..adapters.config import ADAPTER_FILENAME
from ..run.resume import RESULT_FILE, checkpoint_step
from ..run.rundir import LOCK_NAME
from .forms import command_line
from .launch_records import LaunchRecords, lock_holder, read_json
from .run_files import data_file, finite_or_none, inside, log_tail, mtime, mtime_or0, newest, read_csv_metrics

STATUSES = ("queued", "running", "finished", "failed", "stopped", "interrupted")
STOP_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
_MARKERS = (".hydra", LOCK_NAME, "checkpoints", RESULT_FILE)


class RunStore:
    """Run dirs under ``<workdir>/outputs`` (UI- and CLI-launched alike), read.

    Args:
        workdir: the launch dir (runs are ``<workdir>/outputs/runs/<run_name>``, sweeps
            ``<workdir>/outputs/multirun/...``).
        state_dir: where the UI's launches (pid, overrides, devices, log) and the queue are kept;
            default ``<workdir>/outputs/.ui`` (:class:`~flux_lightning.ui.launch_records.LaunchRecords`).
    """

    def __init__(self, workdir: str | os.PathLike, *, state_dir: str | os.PathLike | None = None):
        self.workdir = Path(workdir).resolve()
        self.outputs = self.workdir / "outputs"
        self.records = LaunchRecords(state_dir or self.outputs / ".ui")
        self._cache: dict[tuple, tuple] = {}
        self._accumulators: dict[str, object] = {}

    # -- run dirs -------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        """The dir of ``run_id`` (its path under ``outputs/``). Raises PermissionError: not a run id, or
        one that leads outside ``outputs/``."""
        text = str(run_id).strip("/")
        rel = PurePosixPath(text)
        if not text or rel.is_absolute() or ".." in rel.parts or rel.parts[0].startswith("."):
            raise PermissionError(f"not a run id: {run_id!r}")
        path = self.outputs / rel
        if not path.resolve().is_relative_to(self.outputs.resolve()):
            raise PermissionError(f"run {run_id!r} leads outside {self.outputs}")
        return path

    def id_of(self, run_dir: Path) -> str:
        """The run id of a run dir (its path under ``outputs/``). Raises ValueError: outside ``outputs/``."""
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
            if here == self.records.state_dir:
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

    def cli_overrides(self, run_dir: Path) -> list[str] | None:
        """The arguments a run was started with, from its ``.hydra`` files (``--config-dir=`` first),
        or None without ``.hydra/overrides.yaml``."""

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
        return self._cached("result", run_dir / RESULT_FILE, lambda: read_json(run_dir / RESULT_FILE, {}))

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
    def summary(self, run_id: str, rec: dict | None, queued: dict | None, stops: dict) -> dict:
        """The listing's entry of one run, from its latest launch record, its queue entry and the stop
        times (read by the caller, under ``records.lock``)."""
        run_dir = self.run_dir(run_id)
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
        state = self.records.state(rec)
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
        with self.records.lock:
            latest, queue, stops = self.records.latest(), self.records.queue(), self.records.stops()
            ids = {self.id_of(d) for d in self._found_dirs()}
            ids |= set(latest) | {q["id"] for q in queue}
            queued = {q["id"]: q for q in queue}
            out = [self.summary(i, latest.get(i), queued.get(i), stops) for i in ids]
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
        with self.records.lock:
            queued = next((q for q in self.records.queue() if q["id"] == run_id), None)
            rec = self.records.latest().get(run_id)
            run_dir = self.run_dir(run_id)
            if rec is None and queued is None and not run_dir.is_dir():
                raise KeyError(f"no run {run_id} under {self.outputs}")
            info = self.summary(run_id, rec, queued, self.records.stops())
            source = queued or rec
            overrides = source["overrides"] if source else (self.cli_overrides(run_dir) or [])
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
        for rec in self.records.every_launch():
            if rec["id"] == run_id:
                status = self.records.status(rec["key"])
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
            run_dir = self.run_dir(run_id)
            own = newest(run_dir.glob("*.log")) if run_dir.is_dir() else None
            if own is None:
                raise FileNotFoundError(f"run {run_id} has no log of its own")
            return own
        if not re.fullmatch(r"[A-Za-z0-9_.=,+-]+", str(key)):
            raise FileNotFoundError(f"no attempt {key!r} of run {run_id}")
        rec = self.records.launch(key)
        if rec is None or rec.get("id") != run_id or not rec.get("log") or not Path(rec["log"]).is_file():
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
        run_dir = self.run_dir(run_id)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"no run {run_id}")
        return inside(run_dir, relpath)

    data_file = staticmethod(data_file)
