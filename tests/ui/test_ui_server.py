"""The web UI's server: the token rule and the doors to files (run files, dataset previews).

Starlette's TestClient, no browser, no training: a run dir is laid out by hand as the CLI writes it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the web UI needs the ui extra: pip install -e '.[ui]'")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")
pytest.importorskip("uvicorn", reason="the web UI needs the ui extra: pip install -e '.[ui]'")
from starlette.testclient import TestClient  # noqa: E402

from flux_lightning.ui import server  # noqa: E402
from flux_lightning.ui.server import create_app  # noqa: E402

SECRET = b"\x89PNG secret outside every run and data dir"


@pytest.fixture
def layout(tmp_path):
    """workdir/outputs/runs/demo (a run dir with a validation image, a LoRA and a log), a data root
    beside it, and a secret file outside both, reachable by a symlink from inside each."""
    workdir, data, outside = tmp_path / "work", tmp_path / "data", tmp_path / "outside"
    run = workdir / "outputs" / "runs" / "demo"
    for d in (run / "validation" / "step_2", run / "lora", run / "checkpoints", data / "set", outside):
        d.mkdir(parents=True)
    (run / "validation" / "step_2" / "circle_64x64.png").write_bytes(b"\x89PNG inside")
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"lora bytes")
    (outside / "secret.png").write_bytes(SECRET)
    (run / "validation" / "step_2" / "escape.png").symlink_to(outside / "secret.png")
    (data / "set" / "ok.png").write_bytes(b"\x89PNG data")
    (data / "set" / "escape.png").symlink_to(outside / "secret.png")
    (workdir / "notes.txt").write_text("not an image")
    return workdir, data, outside


TOKEN = "t0ken"


def _client(layout, **kw) -> TestClient:
    """A client of the UI on loopback, sending its token (``token=None``: a client without one)."""
    workdir, data, _ = layout
    kw.setdefault("token", TOKEN)
    headers = {"Authorization": f"Bearer {kw['token']}"} if kw["token"] and not kw.get("no_token") else {}
    return TestClient(create_app(workdir, data_roots=[data], **kw), base_url="http://127.0.0.1:8001", headers=headers)


def test_beyond_loopback_every_request_needs_the_token(layout):
    workdir, _, _ = layout
    with pytest.raises(ValueError, match="needs a token"):
        create_app(workdir, host="0.0.0.0")
    with pytest.raises(ValueError, match="beyond loopback"):
        create_app(workdir, host="0.0.0.0", no_token=True)
    client = TestClient(create_app(workdir, token="s3cret", host="0.0.0.0"), base_url="http://127.0.0.1:8001")
    for path in (
        "/",
        "/api/runs",
        "/api/form",
        "/static/app.js",
        "/api/runs/runs/demo/files/lora/pytorch_lora_weights.safetensors",
    ):
        refused = client.get(path)
        assert refused.status_code == 401, path
        assert b"lora bytes" not in refused.content
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs?token=wrong").status_code == 401
    assert client.post("/api/runs", json={}).status_code == 401  # no launch without it
    assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/runs?token=s3cret").status_code == 200
    # the page opened with ?token= keeps it as a cookie, for its assets and <img> tags
    opened = client.get("/?token=s3cret", follow_redirects=False)
    assert opened.status_code == 303 and "httponly" in opened.headers["set-cookie"].lower()
    assert client.get("/static/app.js").status_code == 200  # (the client now sends the cookie)
    assert client.get("/").status_code == 200


def test_on_loopback_too_a_token_is_needed_unless_no_token_is_asked_for(layout):
    """Attack: another local user reaches the loopback UI without the token: nothing is served,
    nothing launched."""
    workdir = layout[0]
    with pytest.raises(ValueError, match="needs a token"):
        create_app(workdir)
    store = _RecordingLauncher(layout[0].parent / "recording")
    bare = TestClient(create_app(workdir, token=TOKEN, launcher=store), base_url="http://127.0.0.1:8001")
    for path in ("/", "/api/runs", "/api/form", "/api/runs/runs/demo/files/lora/pytorch_lora_weights.safetensors"):
        refused = bare.get(path)
        assert refused.status_code == 401 and "token" in refused.json()["error"], path
    assert bare.post("/api/runs", json={"selection": {}, "values": {}}).status_code == 401
    assert bare.post("/api/runs/runs/demo/stop", json={}).status_code == 401
    assert store.calls == []
    assert _client(layout).get("/api/runs").status_code == 200
    single_user = _client(layout, token=None, no_token=True)  # an explicit choice, loopback only
    assert single_user.get("/api/runs").status_code == 200 and single_user.get("/").status_code == 200


def test_the_token_comes_from_a_file_or_the_environment_never_from_argv(layout, monkeypatch, capsys, tmp_path):
    import uvicorn

    from flux_lightning.ui.__main__ import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app))
    monkeypatch.delenv(server.TOKEN_ENV, raising=False)
    main(["--workdir", str(layout[0])])  # loopback: a generated token all the same
    token = capsys.readouterr().out.split("?token=", 1)[1].split()[0]
    client = TestClient(served["app"], base_url="http://127.0.0.1:8001")
    assert client.get("/api/runs").status_code == 401 and client.get(f"/api/runs?token={token}").status_code == 200
    (tmp_path / "token").write_text("from-a-file\n")
    main(["--workdir", str(layout[0]), "--token-file", str(tmp_path / "token")])
    assert "?token=from-a-file" in capsys.readouterr().out
    assert (
        TestClient(served["app"], base_url="http://127.0.0.1:8001").get("/api/runs?token=from-a-file").status_code
        == 200
    )
    main(["--workdir", str(layout[0]), "--no-token"])
    assert "?token=" not in capsys.readouterr().out
    assert TestClient(served["app"], base_url="http://127.0.0.1:8001").get("/api/runs").status_code == 200
    with pytest.raises(SystemExit, match="loopback"):
        main(["--workdir", str(layout[0]), "--no-token", "--host", "0.0.0.0"])


def test_the_command_prints_a_url_with_a_generated_token_beyond_loopback(layout, monkeypatch, capsys):
    import uvicorn

    from flux_lightning.ui.__main__ import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app, host=host, port=port))
    monkeypatch.delenv(server.TOKEN_ENV, raising=False)
    main(["--host", "0.0.0.0", "--port", "8123", "--workdir", str(layout[0])])
    url = capsys.readouterr().out.split("http://", 1)[1].split()[0]
    token = url.split("?token=")[1]
    assert url.startswith("localhost:8123/?token=") and len(token) >= 20 and served["port"] == 8123
    client = TestClient(served["app"])
    assert client.get("/api/runs").status_code == 401
    assert client.get(f"/api/runs?token={token}").status_code == 200

    monkeypatch.setenv(server.TOKEN_ENV, "from-env")
    main(["--host", "127.0.0.1", "--workdir", str(layout[0])])
    assert "/?token=from-env\n" in capsys.readouterr().out
    assert TestClient(served["app"], base_url="http://127.0.0.1:8001").get("/api/runs").status_code == 401


def test_other_sites_cannot_reach_or_drive_a_loopback_ui(layout):
    """Even without a token (--no-token): no DNS-rebinding Host, no cross-site or non-JSON change."""
    client = _client(layout, token=None, no_token=True)
    assert client.get("/api/runs", headers={"Host": "evil.example:8001"}).status_code == 403
    for host in ("127.0.0.1:8001", "localhost:8001", "[::1]:8001", "localhost"):
        assert client.get("/api/runs", headers={"Host": host}).status_code == 200, host
    launch = {"selection": {}, "values": {}, "extra": "callbacks.evil._target_=os.system"}
    assert client.post("/api/runs", json=launch, headers={"Origin": "https://evil.example"}).status_code == 403
    simple = client.post("/api/runs", content=b'{"selection": {}}', headers={"Content-Type": "text/plain"})
    assert simple.status_code == 415  # a "simple" cross-site request (no preflight) cannot launch
    assert (
        client.post("/api/runs/runs/demo/stop", json={}, headers={"Origin": "http://127.0.0.1:8001"}).status_code == 409
    )


RUN_FILE_ESCAPES = [
    "/api/runs/runs/demo/files/%2e%2e/%2e%2e/%2e%2e/%2e%2e/outside/secret.png",
    "/api/runs/runs/demo/files/..%2f..%2f..%2f..%2foutside%2fsecret.png",
    "/api/runs/runs/demo/files/validation/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/outside/secret.png",
    "/api/runs/runs/demo/files/{outside}/secret.png",  # absolute (files//tmp/...)
    "/api/runs/runs/demo/files/{outside_encoded}%2Fsecret.png",  # absolute, encoded
    "/api/runs/runs/demo/files/validation/step_2/escape.png",  # symlink out of the run dir
    "/api/runs/%2e%2e/files/outside/secret.png",  # the run id itself
    "/api/runs/..%2f..%2f..%2foutside/files/secret.png",
    "/api/runs/runs/%2e%2e/%2e%2e/%2e%2e/outside/files/secret.png",
    "/api/runs/runs/demo/files/../../../../outside/secret.png",  # (the client folds these: another route)
]


@pytest.mark.parametrize("url", RUN_FILE_ESCAPES)
def test_no_run_file_route_reads_outside_the_run_dir(layout, url):
    outside = layout[2]
    url = url.format(outside=outside, outside_encoded=str(outside).replace("/", "%2F"))
    response = _client(layout).get(url)
    folded = "/../" in url  # the client folds literal dots before sending: no route, 404
    assert response.status_code == (404 if folded else 403), (url, response.status_code, response.text)
    assert SECRET not in response.content


def test_run_files_are_served_and_the_lora_is_an_attachment(layout):
    client = _client(layout)
    image = client.get("/api/runs/runs/demo/files/validation/step_2/circle_64x64.png")
    assert image.status_code == 200 and image.content == b"\x89PNG inside"
    lora = client.get("/api/runs/runs/demo/files/lora/pytorch_lora_weights.safetensors")
    assert lora.status_code == 200 and lora.content == b"lora bytes"
    assert "attachment" in lora.headers["content-disposition"]
    assert client.get("/api/runs/runs/demo/files/validation/step_9/none.png").status_code == 404


DATASET_ESCAPES = [
    "{outside}/secret.png",  # absolute, outside every root
    "{data}/../outside/secret.png",  # .. out of a data root
    "{data}/set/escape.png",  # symlink out of a data root
    "../outside/secret.png",  # relative to the workdir
    "/etc/passwd",
    "{work}/notes.txt",  # inside, but not an image
]


@pytest.mark.parametrize("path", DATASET_ESCAPES)
def test_dataset_previews_read_only_images_under_the_workdir_and_data_roots(layout, path):
    workdir, data, outside = layout
    client = _client(layout)
    path = path.format(outside=outside, data=data, work=workdir)
    response = client.get("/api/dataset/file", params={"path": path})
    assert response.status_code == 403, (path, response.status_code)
    assert SECRET not in response.content
    assert client.get("/api/dataset/file", params={"path": str(data / "set" / "ok.png")}).content == b"\x89PNG data"


def test_the_dataset_check_refuses_a_folder_outside_the_roots(layout):
    workdir, data, outside = layout
    response = _client(layout).post("/api/dataset/check", json={"path": str(outside)})
    assert response.status_code == 403 and "--data-root" in response.json()["error"]
    response = _client(layout).post("/api/dataset/check", json={"path": str(data / ".." / "outside")})
    assert response.status_code == 403


@pytest.fixture
def collector_restored():
    """``cli.main`` postpones full collections and freezes the heap (run/heap.py) as the console script
    does; in this test's process the faked training never ends the postponement: end it here."""
    import gc

    from flux_lightning.run import heap

    yield
    heap.resume_full_collections()
    gc.unfreeze()


@pytest.mark.parametrize(
    ("argv", "called", "passed"),
    [
        (["flux-lightning", "ui", "--port", "9"], "ui", ["--port", "9"]),
        (["flux-lightning", "configure", "--name", "x"], "configure", ["--name", "x"]),
        (["flux-lightning", "lora", "resize", "--rank", "4"], "lora", ["resize", "--rank", "4"]),
        (
            ["flux-lightning", "+experiment=krea_lora", "adapter.rank=4"],
            "train",
            ["flux-lightning", "+experiment=krea_lora", "adapter.rank=4"],
        ),
        (["flux-lightning"], "train", ["flux-lightning"]),
    ],
)
def test_the_console_script_dispatches_ui_configure_and_lora_and_leaves_the_rest_to_hydra(
    monkeypatch, argv, called, passed, collector_restored
):
    import sys

    import flux_lightning.lora_tools.cli
    import flux_lightning.run.train
    import flux_lightning.ui.__main__
    import flux_lightning.wizard.configure
    from flux_lightning import cli

    calls = []
    monkeypatch.setattr(flux_lightning.ui.__main__, "main", lambda args: calls.append(("ui", args)))
    monkeypatch.setattr(flux_lightning.wizard.configure, "main", lambda args: calls.append(("configure", args)) or 0)
    monkeypatch.setattr(flux_lightning.lora_tools.cli, "main", lambda args: calls.append(("lora", args)) or 0)
    monkeypatch.setattr(
        flux_lightning.run.train, "main", lambda: calls.append(("train", list(sys.argv)))
    )  # Hydra reads sys.argv
    monkeypatch.setattr(sys, "argv", argv)
    try:
        cli.main()
    except SystemExit as stop:
        assert stop.code == 0
    assert calls == [(called, passed)]


class _RecordingLauncher:
    """Stands in for RunLauncher where only the wiring of the routes is under test (its store: an
    empty one, on a workdir of its own)."""

    def __init__(self, workdir):
        from flux_lightning.ui.runs import RunStore

        self.calls = []
        self.store = RunStore(workdir)

    def poll(self):
        return []

    def launch(self, overrides, *, devices=None, env=None):
        self.calls.append(("launch", list(overrides), devices, env))
        return "runs/demo"

    def stop(self, run_id):
        self.calls.append(("stop", run_id))
        return {"id": run_id, "pid": 1}

    def resume(self, run_id, checkpoint=None, check=None):
        self.calls.append(("resume", run_id, checkpoint))
        return run_id


def test_launch_refuses_a_run_with_problems_and_starts_the_composed_command(
    layout, cache_root, tiny_folder, monkeypatch
):
    from flux_lightning.run.hardware import choose_devices

    monkeypatch.setenv("FLUX_LIGHTNING_CACHE", str(cache_root))  # validation probes the (built) tiny model
    store = _RecordingLauncher(layout[0].parent / "recording")
    client = TestClient(create_app(layout[0], launcher=store, no_token=True), base_url="http://127.0.0.1:8001")
    bad = client.post("/api/runs", json={"values": {"adapter.rank": "0"}, "hardware": {"mode": "off"}})
    assert bad.status_code == 422 and any(p["field"] == "adapter.rank" for p in bad.json()["problems"])
    assert store.calls == []
    good = client.post(
        "/api/runs", json={"values": {"adapter.rank": "4"}, "extra": "trainer.max_steps=3", "hardware": {"mode": "off"}}
    )
    assert good.status_code == 200 and good.json()["id"] == "runs/demo"
    ((_, overrides, devices, env),) = store.calls
    assert overrides == ["adapter.rank=4", *choose_devices("off").overrides, "trainer.max_steps=3"]
    assert devices == [] and env == {"CUDA_VISIBLE_DEVICES": ""}
    assert good.json()["command"] == "CUDA_VISIBLE_DEVICES='' python -m flux_lightning " + " ".join(overrides)
    assert client.post("/api/runs/runs/demo/stop", json={}).json()["ok"]
    client.post("/api/runs/runs/demo/resume", json={"checkpoint": "checkpoints/step000002.ckpt"})
    assert store.calls[1:] == [("stop", "runs/demo"), ("resume", "runs/demo", "checkpoints/step000002.ckpt")]


# -- attacks: each refused with a clear message, nothing written or signalled -------------------
CODE_OVERRIDES = [
    ("+callbacks.b._target_=pathlib.Path.write_text", "callbacks.b._target_"),
    ("+callbacks.b={_target_:pathlib.Path.write_text,_args_:[x,y]}", "callbacks.b"),
    ("hydra.run.dir=/tmp/elsewhere", "hydra.run.dir"),
    ("hydra/launcher=basic", "hydra/launcher"),
    ("+experiment=../../../tmp/evil", "experiment"),
    ("--config-dir /tmp", "config_dir"),
    ("-m", "-m"),
]


@pytest.mark.parametrize(("line", "field"), CODE_OVERRIDES)
def test_overrides_that_name_code_are_refused_by_field_and_nothing_runs(layout, line, field):
    """Attack: the free-form box (or the values) names a function to call as the UI's owner."""
    workdir = layout[0]
    victim = workdir / "written_by_the_run.txt"
    store = _RecordingLauncher(layout[0].parent / "recording")
    client = TestClient(
        create_app(workdir, token=TOKEN, launcher=store),
        base_url="http://127.0.0.1:8001",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    extra = line if "_target_=" not in line else f"{line}\n+callbacks.b._args_=[{victim},pwned]"
    for route in ("/api/compose", "/api/runs"):
        answer = client.post(route, json={"selection": {}, "values": {}, "extra": extra, "hardware": {"mode": "off"}})
        body = answer.json()
        assert not body["ok"] and (route == "/api/compose" or answer.status_code == 422), body
        refused = [p for p in body["problems"] if p.get("refused")]
        assert refused and refused[0]["field"] == field, body["problems"]
        assert (
            "web UI" in refused[0]["message"]
            or "experiment dirs" in refused[0]["message"]
            or "not a path" in refused[0]["message"]
        )
    key, _, value = line.partition("=")
    if value and not line.startswith("-"):  # the same rule for a value of the form
        body = client.post("/api/compose", json={"values": {key: value}}).json()
        assert not body["ok"] and body["problems"][0]["field"] == key
    assert store.calls == [] and not victim.exists()


def test_code_overrides_pass_with_the_servers_opt_in(layout):
    body = (
        _client(layout, allow_code=True)
        .post("/api/compose", json={"extra": "+callbacks.b._target_=builtins.dict"})
        .json()
    )
    assert not any(p.get("refused") for p in body["problems"])


def test_oversize_and_deep_bodies_are_refused_before_any_work(layout):
    store = _RecordingLauncher(layout[0].parent / "recording")
    client = TestClient(
        create_app(layout[0], token=TOKEN, launcher=store),
        base_url="http://127.0.0.1:8001",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    big = b'{"extra": "' + b"x" * (2 << 20) + b'"}'
    answer = client.post("/api/compose", content=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "larger than 1048576 bytes" in answer.json()["error"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b" " * (1 << 19)

    answer = client.post("/api/runs", content=chunks(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    for depth in (40, 100_000):
        deep = b'{"values": ' + b"[" * depth + b"]" * depth + b"}"
        answer = client.post("/api/runs", content=deep, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and "deeper than 32 levels" in answer.json()["error"], answer.text
    assert (
        client.post("/api/runs", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    )
    assert store.calls == []


def test_a_backend_file_naming_folders_outside_the_roots_reveals_nothing_of_them(layout):
    """Attack: a multidatabackend.json inside the workdir names a folder outside every root."""
    import json

    from PIL import Image

    workdir, data, outside = layout
    for i in range(3):
        Image.new("RGB", (64, 64), "red").save(outside / f"private_{i}.png")
    (data / "set" / "ok.png").unlink()
    Image.new("RGB", (64, 64), "blue").save(data / "set" / "ok.png")
    (workdir / "multidatabackend.json").write_text(
        json.dumps(
            [
                {"id": "theirs", "instance_data_dir": str(outside), "resolution": 64, "minimum_image_size": 0},
                {"id": "missing", "instance_data_dir": str(outside / "nothing_here"), "resolution": 64},
                {"id": "mine", "instance_data_dir": str(data / "set"), "resolution": 64, "minimum_image_size": 0},
                {"id": "text", "dataset_type": "text_embeds"},
            ]
        )
    )
    answer = _client(layout).post("/api/dataset/check", json={"path": "multidatabackend.json"})
    assert answer.status_code == 200
    report = answer.json()
    backends = {b["id"]: b for b in report["backends"]}
    assert backends["mine"]["images"] == 1
    for name in ("theirs", "missing"):
        assert backends[name]["images"] is None and backends[name]["buckets"] == [] and backends[name]["samples"] == []
        assert any(f"backend {name}:" in p and "--data-root" in p for p in report["problems"])
    text = answer.text
    assert "private_" not in text and "does not exist" not in text and "nothing_here" in text  # named, not probed

    # a symlink inside a data root that leads out of it: its files are neither counted nor named
    (data / "set" / "link").symlink_to(outside, target_is_directory=True)
    answer = _client(layout).post("/api/dataset/check", json={"path": str(data / "set"), "resolution": 64})
    report = answer.json()
    assert report["backends"][0]["images"] == 1 and "private_" not in answer.text
    assert any("lead outside" in p for p in report["problems"])


def test_stop_never_signals_a_process_that_reused_a_recorded_pid_and_resume_is_not_blocked(layout, tmp_path):
    """Attack (or a reboot / OOM kill): status.json names the pid of another process (a sleep)."""
    import json
    import subprocess
    import sys
    import time

    from flux_lightning.ui.launch_records import proc_start
    from flux_lightning.ui.launcher import RunLauncher
    from flux_lightning.ui.runs import RunStore

    from .test_ui_backend import FAKE_PYTHON, wait_until

    workdir = layout[0]
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    gate = tmp_path / "gate"
    launcher = RunLauncher(RunStore(workdir), python=str(fake))
    launches = launcher.records.launch_dir
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for start in (
            None,
            proc_start(sleeper.pid),
            12345,
        ):  # no start recorded / the right one (wrong command) / a stale one
            rec = {
                "key": "1-runs_demo",
                "id": "runs/demo",
                "overrides": ["trainer.max_steps=3"],
                "command": "x",
                "devices": [],
                "env": {"FAKE_GATE": str(gate)},
                "log": str(launches / "1-runs_demo.log"),
                "launched_at": time.time(),
                "supervisor_pid": 999_999_999,
                "supervisor_start": 1,
            }
            (launches / "1-runs_demo.json").write_text(json.dumps(rec))
            (launches / "1-runs_demo.log").write_text("attempt 1\n")
            (launches / "1-runs_demo.status.json").write_text(json.dumps({"pid": sleeper.pid, "start": start}))
            client = TestClient(
                create_app(workdir, token=TOKEN, launcher=launcher),
                base_url="http://127.0.0.1:8001",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert client.get("/api/runs/runs/demo").json()["status"] == "interrupted"
            answer = client.post("/api/runs/runs/demo/stop", json={})
            assert answer.status_code == 409 and "not running" in answer.json()["error"]
            time.sleep(0.1)
            assert sleeper.poll() is None, "the unrelated process was signalled"
        answer = client.post("/api/runs/runs/demo/resume", json={})  # the stale record does not block it
        assert answer.status_code == 200, answer.text
        wait_until(lambda: "started" in client.get("/api/runs/runs/demo").json()["log_tail"], what="the resumed run")
        info = client.get("/api/runs/runs/demo").json()
        assert info["status"] == "running" and len(info["attempts"]) == 2  # the first attempt's log is kept
        first = client.get("/api/runs/runs/demo/log", params={"attempt": info["attempts"][0]["key"]})
        assert first.text == "attempt 1\n"
        assert client.get("/api/runs/runs/demo/log", params={"attempt": "../../x"}).status_code == 404
        gate.touch()
        wait_until(lambda: client.get("/api/runs/runs/demo").json()["status"] == "finished", what="the run to finish")
        again = client.post("/api/runs/runs/demo/resume", json={})
        assert again.status_code == 409 and "finished" in again.json()["error"]
    finally:
        gate.touch()
        sleeper.kill()
        sleeper.wait()


def test_the_help_is_plain_text(capsys):
    from flux_lightning.ui.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "--token-file" in shown and "--no-token" in shown and "--config-dir" in shown
    assert "``" not in shown and ":func:" not in shown and "--token T" not in shown
