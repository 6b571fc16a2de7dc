"""The web UI's HTTP side: a Starlette app serving the page (``static/``) and a JSON API over the
library's own pieces (``forms``, ``runs``, ``launcher``, ``dataset_check``, ``hardware``).

Security model (a shared GPU machine is the normal case):

- Every request carries the token: ``Authorization: Bearer <token>``, ``?token=<token>`` or the
  cookie the page gets when it is opened with ``?token=`` (so ``<img>`` tags and the page's own
  assets pass too). ``create_app`` builds no app without one unless ``no_token=True``, which only
  loopback allows (a single-user machine). :class:`~flux_lightning.ui.gate.Gate` checks it (and Host,
  Origin, Content-Type, the body's size) before any route runs.
- Files are read only through checked doors: a run's files through ``RunStore.file`` (inside the run
  dir), dataset previews and checks through :func:`inside_roots` (inside the workdir or a
  ``data_roots`` folder, symlinks resolved first; a backend file's folders too).
- What runs is checked by :mod:`policy`: no override naming code, no ``hydra.*``, no
  ``--config-dir`` but the server's experiment dirs (unless ``allow_code=True``).
- Request bodies: at most ``MAX_BODY`` bytes (413) and ``MAX_DEPTH`` levels of JSON (400).
- Stop and Resume signal only a process whose start time and command match the recorded ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shlex
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .gate import MAX_BODY, Gate, is_loopback

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
TOKEN_ENV = "FLUX_LIGHTNING_UI_TOKEN"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
RUN_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=,+-]*$")  # one folder of a run id (runs/demo, multirun/.../0)
POLL_SECONDS = 1.0
MAX_DEPTH = 32  # nesting levels of its JSON


class BadRequest(ValueError):
    """A request the API cannot read (400)."""


def json_depth(value) -> int:
    """How deeply ``value`` nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack += [(v, depth) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def inside_roots(path: str | Path, roots: list[Path]) -> Path:
    """``path`` resolved (symlinks followed, ``..`` folded) if it lies inside one of ``roots``;
    a relative path is taken relative to the first root (the workdir). Raises PermissionError."""
    raw = Path(path).expanduser()
    target = (raw if raw.is_absolute() else roots[0] / raw).resolve()
    for root in roots:
        if target == root or target.is_relative_to(root):
            return target
    shown = ", ".join(str(r) for r in roots)
    raise PermissionError(
        f"{path} is outside the folders this UI may read ({shown}); start the UI with --data-root <folder>"
    )


def _plain(value: Any) -> Any:
    """JSON-able form of the helpers' results (dataclasses, paths, tuples)."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class UI:
    """The API's state: the runs (read by ``store``, started and stopped by ``launcher``), the readable
    roots, the hardware and form helpers. ``launcher`` None: a :class:`RunLauncher` on a
    :class:`RunStore` of ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        data_roots,
        launcher,
        python: str,
        *,
        config_dirs=(),
        allow_code: bool = False,
        max_cpu_runs: int | None = 1,
    ):
        from .launcher import RunLauncher
        from .runs import RunStore

        self.workdir = Path(workdir).resolve()
        self.roots = [self.workdir, *(Path(r).expanduser().resolve() for r in data_roots)]
        wizard = self.workdir / "flux_lightning_configs"  # the wizard's default dir, when there is one
        dirs = [Path(d).expanduser() for d in config_dirs] + ([wizard] if wizard.is_dir() else [])
        self.config_dirs = list(dict.fromkeys((d if d.is_absolute() else self.workdir / d).resolve() for d in dirs))
        self.allow_code = allow_code
        if launcher is None:
            launcher = RunLauncher(RunStore(self.workdir), python=python, max_cpu_runs=max_cpu_runs)
        self.launcher = launcher
        self.store = launcher.store

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    async def body(request: Request) -> dict:
        """The request's JSON object. Raises BadRequest: not JSON, not an object, or too deep."""
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except RecursionError:
            raise BadRequest(f"the JSON body nests deeper than {MAX_DEPTH} levels") from None
        except ValueError as err:
            raise BadRequest(f"the body is not JSON ({err})") from None
        if json_depth(data) > MAX_DEPTH:
            raise BadRequest(f"the JSON body nests deeper than {MAX_DEPTH} levels")
        if not isinstance(data, dict):
            raise BadRequest("send a JSON object")
        return data

    def refusals(self, args: list[str], fields: list[str] | None = None) -> list[dict]:
        """The arguments the UI will not run (see :mod:`policy`), as problems naming their field."""
        if self.allow_code:
            return []
        from .policy import field_of_arg, refusal

        out = []
        for i, arg in enumerate(args):
            why = refusal(arg, config_dirs=self.config_dirs, roots=self.roots, workdir=self.workdir)
            if why:
                out.append({"field": fields[i] if fields else field_of_arg(arg), "message": why, "refused": True})
        return out

    def check_args(self, args: list[str]) -> None:
        """Raise PermissionError naming the first argument the UI will not run (resume)."""
        refused = self.refusals(list(args))
        if refused:
            raise PermissionError(refused[0]["message"])

    def config_dir_of(self, data: dict) -> str | None:
        """The experiment dir a request names (``config_dir``): one the server knows, or PermissionError."""
        folder = data.get("config_dir")
        if not folder:
            return None
        path = Path(str(folder)).expanduser()
        path = (path if path.is_absolute() else self.workdir / path).resolve()
        if path not in self.config_dirs and not self.allow_code:
            raise PermissionError(
                f"config_dir {folder} is not one of this UI's experiment dirs; start the UI with --config-dir {folder}"
            )
        return str(path)

    @staticmethod
    def run_id(request: Request) -> str:
        run_id = request.path_params["run_id"]
        if not all(RUN_PART.match(part) and ".." not in part for part in run_id.split("/")):
            raise PermissionError(f"not a run id: {run_id!r}")
        return run_id

    @staticmethod
    def device_choice(hardware: dict | None):
        """The hardware page's choice -> (hardware.DeviceChoice, the GPU indices the run occupies);
        (None, None) without a choice (the run's own config decides)."""
        if not hardware:
            return None, None
        from flux_lightning.run.hardware import choose_devices, detect_accelerators

        mode = hardware.get("mode", "auto")
        selected = [int(i) for i in hardware.get("selected") or []]
        found = detect_accelerators() if mode != "off" else []
        choice = choose_devices(mode, selected or None, accelerators=found)
        gpus = [] if mode == "off" else selected if mode == "manual" else [a.index for a in found]
        return choice, gpus

    def compose(self, data: dict) -> dict:
        """compose_run + the hardware choice + the free-form extra overrides, as one result.
        Arguments the UI will not run (:mod:`policy`) are refused before anything is composed."""
        from .forms import command_line, compose_run, config_dir_args, hydra_value
        from .policy import split_flags

        extra = split_flags([line.strip() for line in str(data.get("extra") or "").splitlines() if line.strip()])
        values = data.get("values") or {}
        selection = data.get("selection") or {}
        if not isinstance(values, dict) or not isinstance(selection, dict):
            raise BadRequest("values and selection are JSON objects (field -> value, group -> option)")
        try:
            config_dir = self.config_dir_of(data)
        except PermissionError as err:
            return {
                "ok": False,
                "problems": [{"field": "experiment", "message": str(err), "refused": True}],
                "overrides": [],
                "command": "",
                "values": {},
                "run_dir": None,
                "env": {},
                "devices": None,
            }
        # what would be asked for, checked first: group choices, the values (as written), the extra lines
        asked = [(f"{'+' if g == 'experiment' else ''}{g}={o}", g) for g, o in selection.items() if o not in (None, "")]
        asked += [(f"{k}={v if isinstance(v, str) else hydra_value(v)}", k) for k, v in values.items()]
        asked += [(line, None) for line in extra]
        refused = self.refusals([a for a, _ in asked], [f or _field(a) for a, f in asked])
        if refused:
            shown = config_dir_args(config_dir, self.workdir) + [a for a, _ in asked]
            return {
                "ok": False,
                "problems": refused,
                "overrides": shown,
                "command": command_line(shown),
                "values": {},
                "run_dir": None,
                "env": {},
                "devices": None,
            }
        try:
            choice, gpus = self.device_choice(data.get("hardware") or {"mode": "auto"})
            hardware_problem = None
        except ValueError as err:  # e.g. manual with no GPU ticked: a problem of the form, not a 500
            choice, gpus, hardware_problem = None, None, f"hardware: {err}"
        added = [*(choice.overrides if choice else []), *extra]
        result = _plain(
            compose_run(dict(selection), dict(values), extra=added, workdir=self.workdir, config_dir=config_dir)
        )
        if hardware_problem:
            result["ok"] = False
            result.setdefault("problems", []).append({"field": None, "message": hardware_problem})
        forecast = result.get("forecast")
        if forecast and gpus:  # a warning for each chosen GPU the forecast does not fit
            from flux_lightning.model.forecast import GIB, HEADROOM_BYTES
            from flux_lightning.run.hardware import detect_accelerators

            need = forecast["total_gib"] * GIB + HEADROOM_BYTES
            forecast["warnings"] = [
                f"the VRAM forecast ({forecast['total_gib']:.1f} GiB + {HEADROOM_BYTES / GIB:.1f} GiB headroom) exceeds "
                f"cuda:{a.index} {a.name} ({a.memory_gib:.1f} GiB)"
                for a in detect_accelerators()
                if a.index in gpus and need > a.memory_bytes
            ]
        env = dict(choice.env) if choice else {}
        result["env"] = env
        result["devices"] = gpus
        if env:
            prefix = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
            result["command"] = f"{prefix} {result['command']}"
        return result

    # -- routes --------------------------------------------------------------------------------
    async def index(self, request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def form(self, request: Request):
        from .form_fields import experiments
        from .forms import form_spec

        spec = await asyncio.to_thread(form_spec)
        spec["experiment_sources"] = await asyncio.to_thread(experiments, self.config_dirs)
        spec["config_dirs"] = [str(d) for d in self.config_dirs]
        return JSONResponse(_plain(spec))

    async def form_values(self, request: Request):
        """The groups' options and the fields' values an experiment (and group options) compose to."""
        from .forms import composed_form

        data = await self.body(request)
        selection = data.get("selection") or {}
        if not isinstance(selection, dict):
            raise BadRequest("selection is a JSON object (group -> option)")
        config_dir = self.config_dir_of(data)
        refused = self.refusals(
            [f"{'+' if g == 'experiment' else ''}{g}={o}" for g, o in selection.items() if o], list(selection)
        )
        if refused:
            return JSONResponse({"error": refused[0]["message"], "problems": refused}, status_code=422)
        try:
            return JSONResponse(
                _plain(await asyncio.to_thread(composed_form, selection, config_dir=config_dir, workdir=self.workdir))
            )
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors (an unknown option)
            return _error(422, str(err).strip().splitlines()[0])

    async def compose_route(self, request: Request):
        return JSONResponse(await asyncio.to_thread(self.compose, await self.body(request)))

    async def dataset(self, request: Request):
        from .dataset_check import check_dataset

        data = await self.body(request)
        path = str(data.get("path") or "").strip()
        if not path:
            return _error(400, "give a folder or a multidatabackend.json")
        try:
            target = inside_roots(path, self.roots)
        except PermissionError as err:
            return _error(403, str(err))
        if not target.exists():
            return _error(404, f"{path} does not exist")
        kwargs = {"resolution": int(data["resolution"])} if data.get("resolution") else {}
        for key in ("caption_strategy", "instance_prompt"):
            if data.get(key):
                kwargs[key] = str(data[key])
        # a multidatabackend.json may name folders elsewhere: the check does not look at them
        result = _plain(
            await asyncio.to_thread(check_dataset, target, workdir=self.workdir, readable=self._readable, **kwargs)
        )
        result["path"] = str(target)
        return JSONResponse(result)

    def _readable(self, path) -> bool:
        try:
            inside_roots(path, self.roots)
            return True
        except PermissionError:
            return False

    async def dataset_file(self, request: Request):
        try:
            target = inside_roots(request.query_params.get("path", ""), self.roots)
        except PermissionError as err:
            return _error(403, str(err))
        if target.suffix.lower() not in IMAGE_SUFFIXES:
            return _error(403, f"{target.name} is not an image; only images are previewed")
        if not target.is_file():
            return _error(404, f"{target} is not a file")
        return FileResponse(target)

    async def hardware(self, request: Request):
        from flux_lightning.run.hardware import detect_accelerators

        accelerators = _plain(await asyncio.to_thread(detect_accelerators))
        return JSONResponse({"accelerators": accelerators})

    async def hardware_choice(self, request: Request):
        data = await self.body(request)
        try:
            choice, gpus = self.device_choice({"mode": data.get("mode", "auto"), "selected": data.get("selected")})
            return JSONResponse({**_plain(choice), "gpus": gpus, "summary": choice.describe()})
        except (ValueError, TypeError) as err:
            return _error(422, str(err))

    async def runs(self, request: Request):
        return JSONResponse(_plain(await asyncio.to_thread(self.store.runs)))

    async def launch(self, request: Request):
        composed = await asyncio.to_thread(self.compose, await self.body(request))
        if not composed.get("ok"):
            return JSONResponse(composed, status_code=422)
        run_id = await asyncio.to_thread(
            self.launcher.launch, composed["overrides"], devices=composed["devices"], env=composed["env"] or None
        )
        return JSONResponse({**composed, "id": run_id})

    async def run(self, request: Request):
        return JSONResponse(_plain(await asyncio.to_thread(self.store.run, self.run_id(request))))

    async def stop(self, request: Request):
        await asyncio.to_thread(self.launcher.stop, self.run_id(request))
        return JSONResponse({"ok": True})

    async def resume(self, request: Request):
        data = await self.body(request)
        run_id = await asyncio.to_thread(
            self.launcher.resume, self.run_id(request), data.get("checkpoint"), check=self.check_args
        )
        return JSONResponse({"ok": True, "id": run_id or self.run_id(request)})

    async def run_file(self, request: Request):
        run_id, relpath = self.run_id(request), request.path_params["relpath"]
        path = await asyncio.to_thread(self.store.file, run_id, relpath)
        headers = {"Cache-Control": "no-store"}
        if request.query_params.get("download") or path.suffix in (".safetensors", ".ckpt"):
            name = f"{run_id}_{path.name}" if path.suffix == ".safetensors" else path.name
            return FileResponse(path, filename=name, headers=headers)
        media = "text/plain; charset=utf-8" if path.suffix in (".log", ".txt", ".yaml", ".json", "") else None
        return FileResponse(path, media_type=media, headers=headers)

    async def log_file(self, request: Request):
        """The run's whole log: the file the store names for it (never a path from the request)."""
        run_id = self.run_id(request)
        attempt = request.query_params.get("attempt")
        if attempt:  # one launch's log (every attempt keeps its own)
            path = await asyncio.to_thread(self.store.attempt_log, run_id, attempt)
            return FileResponse(path, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"})
        info = await asyncio.to_thread(self.store.run, run_id)
        if not info.get("log") or not Path(info["log"]).is_file():
            return _error(404, f"run {run_id} has no log yet")
        return FileResponse(info["log"], media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"})

    async def lora(self, request: Request):
        run_id = self.run_id(request)
        info = await asyncio.to_thread(self.store.run, run_id)
        relpath = info.get("lora") if isinstance(info, dict) else None
        if not relpath:
            return _error(404, f"run {run_id} has no adapter file yet (it is written at the end of the run)")
        path = await asyncio.to_thread(self.store.file, run_id, relpath)
        return FileResponse(path, filename=f"{run_id}_{path.name}")


def _response_for(request: Request, exc: Exception) -> JSONResponse:
    """An exception of a helper -> the HTTP answer (403 for a refused path, 404 for a missing one)."""
    if isinstance(exc, PermissionError):
        return _error(403, str(exc))
    if isinstance(exc, BadRequest):
        return _error(400, str(exc))
    from flux_lightning.errors import RunDirInUse

    from .launcher import NothingToResume

    if isinstance(exc, (ProcessLookupError, RunDirInUse, NothingToResume)):
        return _error(409, str(exc))
    if isinstance(exc, (FileNotFoundError, KeyError, LookupError)):
        return _error(404, str(exc).strip("'\""))
    if isinstance(exc, (ValueError, TypeError)):
        return _error(422, str(exc))
    log.exception("UI request failed: %s %s", request.method, request.url.path)
    return _error(500, f"{type(exc).__name__}: {exc}")


class _RunIdConvertor(Convertor):
    """A run id in a URL: one or more folders, the shortest that lets the rest of the route match."""

    regex = r"[^/].*?"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("runid", _RunIdConvertor())


def _field(arg: str) -> str:
    from .policy import field_of_arg

    return field_of_arg(arg)


def _guarded(handler):
    async def route(request: Request):
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer
            return _response_for(request, exc)

    return route


def create_app(
    workdir: Path,
    *,
    token: str | None = None,
    no_token: bool = False,
    data_roots: list[Path] | tuple = (),
    config_dirs: list[Path] | tuple = (),
    allow_code: bool = False,
    host: str = "127.0.0.1",
    launcher=None,
    python: str = sys.executable,
    poll_seconds: float = POLL_SECONDS,
    max_body: int = MAX_BODY,
    max_cpu_runs: int | None = 1,
) -> Starlette:
    """The UI app for runs under ``workdir`` (``RunStore``, ``RunLauncher``), previews under ``workdir`` and
    ``data_roots``, experiments from the built-in tree and ``config_dirs`` (and
    ``<workdir>/flux_lightning_configs`` when it exists). Every request needs ``token``; only
    ``no_token=True`` on a loopback ``host`` serves without one. ``allow_code`` lets requests carry
    overrides that name code (:mod:`policy`). A background task calls ``launcher.poll()`` every
    ``poll_seconds`` (queue, finished runs)."""
    if token is None and not no_token:
        raise ValueError(
            f"the UI needs a token: set {TOKEN_ENV}, or pass --token-file <file> (or --no-token on a single-user machine)"
        )
    if no_token and not is_loopback(host):
        raise ValueError(f"--no-token serves this machine only; binding to {host} (beyond loopback) needs a token")
    if no_token:
        token = None
    ui = UI(
        Path(workdir),
        list(data_roots),
        launcher,
        python,
        config_dirs=config_dirs,
        allow_code=allow_code,
        max_cpu_runs=max_cpu_runs,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def poll():
            while True:
                try:
                    await asyncio.to_thread(ui.launcher.poll)
                except Exception:  # noqa: BLE001 - a failed poll is logged; the next one tries again
                    log.exception("polling the runs failed")
                await asyncio.sleep(poll_seconds)

        task = asyncio.create_task(poll())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # a run id is its dir under outputs/ (``runs/demo``): slashes included, matched shortest-first
    routes = [
        Route("/", _guarded(ui.index)),
        Route("/api/form", _guarded(ui.form)),
        Route("/api/form/values", _guarded(ui.form_values), methods=["POST"]),
        Route("/api/compose", _guarded(ui.compose_route), methods=["POST"]),
        Route("/api/dataset/check", _guarded(ui.dataset), methods=["POST"]),
        Route("/api/dataset/file", _guarded(ui.dataset_file)),
        Route("/api/hardware", _guarded(ui.hardware)),
        Route("/api/hardware/choice", _guarded(ui.hardware_choice), methods=["POST"]),
        Route("/api/runs", _guarded(ui.runs)),
        Route("/api/runs", _guarded(ui.launch), methods=["POST"]),
        Route("/api/runs/{run_id:runid}/stop", _guarded(ui.stop), methods=["POST"]),
        Route("/api/runs/{run_id:runid}/resume", _guarded(ui.resume), methods=["POST"]),
        Route("/api/runs/{run_id:runid}/lora", _guarded(ui.lora)),
        Route("/api/runs/{run_id:runid}/log", _guarded(ui.log_file)),
        Route("/api/runs/{run_id:runid}/files/{relpath:path}", _guarded(ui.run_file)),
        Route("/api/runs/{run_id:path}", _guarded(ui.run)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Gate, token=token, loopback=is_loopback(host), max_body=max_body)],
        lifespan=lifespan,
    )
    app.state.ui = ui
    return app
