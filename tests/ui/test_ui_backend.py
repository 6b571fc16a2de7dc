"""The web UI's backend services (flux_lightning/ui: forms, runs, dataset_check), without a server:
the form from the schemas, compose_run's validation, run dirs made by hand (as the CLI leaves them),
launch/queue/restart/stop/resume with a stand-in for ``python`` (no model loads), path confinement,
and the dataset check."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux_lightning.errors import RunDirInUse
from flux_lightning.ui.dataset_check import check_dataset
from flux_lightning.ui.form_fields import field_index
from flux_lightning.ui.forms import coerce, compose_run, form_spec
from flux_lightning.ui.launch_records import lock_holder
from flux_lightning.ui.launcher import RunLauncher
from flux_lightning.ui.runs import RunStore

# Stands in for `python -m flux_lightning <overrides>`: takes the run dir's lock like RunDirLock,
# writes .hydra/, then waits for $FAKE_GATE (writes result.json, exit 0) or SIGTERM (writes
# checkpoints/last.ckpt, exit 143 like a graceful stop).
FAKE_PYTHON = """#!{python}
import fcntl, json, os, signal, sys, time
from pathlib import Path
args = sys.argv[3:]
opts = dict(a.split("=", 1) for a in args if "=" in a)
steps = int(opts.get("trainer.max_steps", 3))
run = Path(opts.get("hydra.run.dir", "outputs/runs/" + opts.get("run_name", "demo")))
(run / ".hydra").mkdir(parents=True, exist_ok=True)
fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
(run / ".hydra" / "overrides.yaml").write_text("".join("- " + a + "\\n" for a in args))
(run / ".hydra" / "config.yaml").write_text("trainer:\\n  max_steps: %d\\n" % steps)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("started", os.environ.get("CUDA_VISIBLE_DEVICES"), " ".join(args), flush=True)
gate = Path(os.environ["FAKE_GATE"])
while True:
    if stop:
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"stand-in")
        print("stopped by SIGTERM", flush=True)
        os._exit(143)
    if gate.exists():
        (run / "result.json").write_text(json.dumps({{"steps": steps}}))
        sys.exit(0)
    time.sleep(0.02)
"""


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def by_id(store: RunStore) -> dict[str, dict]:
    return {r["id"]: r for r in store.runs()}


# -- the form -----------------------------------------------------------------------------------
def test_form_spec_lists_groups_options_and_the_defaults_a_plain_run_has():
    spec = form_spec()
    json.dumps(spec)  # served as it is
    groups = {g["name"]: g for g in spec["groups"]}
    for name in (
        "experiment",
        "model",
        "quantization",
        "optimizer",
        "lr_scheduler",
        "adapter",
        "dataset",
        "timesteps",
        "trainer",
        "callbacks",
    ):
        assert name in groups
    assert "krea_lora" in spec["experiments"] and groups["experiment"]["default_option"] is None
    assert groups["model"]["default_option"] == "tiny" and "krea" in groups["model"]["options"]
    assert groups["optimizer"]["default_option"] == "adamw_bf16" and "prodigy" in groups["optimizer"]["options"]
    fields = {f["key"]: f for g in spec["groups"] for f in g["fields"]}
    rank = fields["adapter.rank"]
    assert (rank["type"], rank["default"]) == ("int", 16) and "rank" in rank["doc"].lower()
    assert fields["adapter.type"]["type"] == "choice" and fields["adapter.type"]["choices"] == ["lora", "lokr"]
    # the default is what `python -m flux_lightning` runs with (the demo's lr), next to the schema's own
    assert fields["optimizer.lr"]["default"] == 1e-3 and fields["optimizer.lr"]["schema_default"] == 1e-4
    assert fields["trainer.max_steps"]["default"] == 300 and fields["trainer.max_steps"]["doc"]
    assert "trainer.devices" not in fields  # one device control: the Hardware page
    assert "Default:" not in fields["trainer.log_every_n_steps"]["doc"]  # Lightning's default is not this project's
    assert fields["callbacks.validation.validation_prompt"]["default"] == "a red circle on a white background"
    assert fields["callbacks.validation.every_n_steps"]["default"] == 100
    assert "tiny" in fields["model.flavour"]["choices"]
    assert fields["model.quantization.base_model_precision"]["default"] == "none"
    assert fields["dataset.caption_strategy"]["doc"]  # "a, b, c: ..." lines document each name


def test_compose_run_reports_problems_by_field_and_its_command_is_the_run(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from flux_lightning.config.schema import config_dir

    bad = compose_run({"model": "tiny"}, {"adapter.rank": "0", "trainer.max_steps": "ten"}, workdir=tmp_path)
    assert not bad["ok"]
    fields = {p["field"]: p["message"] for p in bad["problems"]}
    assert "adapter.rank=0" in fields["adapter.rank"]  # the library's own check (AdapterConfig.problems)
    assert "integer" in fields["trainer.max_steps"]  # a form value that is not of the field's type
    devices = {"key": "trainer.devices", "type": "str", "nullable": False}
    assert [coerce(v, devices) for v in ("2", "auto", "0,1", "[3]")] == [2, "auto", [0, 1], [3]]
    assert (
        coerce("1e-3", field_index()["optimizer.lr"]) == 1e-3 and coerce("null", field_index()["adapter.alpha"]) is None
    )
    unknown = compose_run({"model": "turbo"}, {}, workdir=tmp_path)
    assert [p["field"] for p in unknown["problems"]] == ["model"] and "tiny" in unknown["problems"][0]["message"]

    values = {
        "adapter.rank": "4",
        "trainer.max_steps": "10",
        "callbacks.validation.validation_prompt": "a 'blue' square: 2 px",
    }
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):  # a caller's own Hydra state survives
        good = compose_run({"model": "tiny", "optimizer": "adamw"}, values, workdir=tmp_path, check_sources=False)
        assert GlobalHydra.instance().is_initialized()
    assert not GlobalHydra.instance().is_initialized()
    assert good["ok"], good["problems"]
    assert good["run_dir"] == "outputs/runs/demo" and good["values"]["adapter.rank"] == 4
    assert "optimizer=adamw" in good["overrides"] and "model=tiny" not in good["overrides"]  # only what differs
    argv = shlex.split(good["command"])
    assert argv[:3] == ["python", "-m", "flux_lightning"] and argv[3:] == good["overrides"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=argv[3:])  # what the shell hands the CLI
    assert (cfg.adapter.rank, cfg.trainer.max_steps, cfg.optimizer.name) == (4, 10, "adamw")
    assert cfg.callbacks.validation.validation_prompt == "a 'blue' square: 2 px"
    assert cfg.optimizer.lr == 1e-3 and cfg.model.flavour == "tiny"


# -- run dirs -----------------------------------------------------------------------------------
def _cli_run(outputs: Path, name: str = "demo") -> Path:
    """A run dir as `python -m flux_lightning trainer.max_steps=4 logger=tensorboard_csv` leaves it."""
    from safetensors.torch import save_file
    from torch.utils.tensorboard import SummaryWriter

    run = outputs / "runs" / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- trainer.max_steps=4\n- logger=tensorboard_csv\n")
    (run / ".hydra" / "config.yaml").write_text("trainer:\n  max_steps: 4\n  devices: 1\n")
    (run / ".lock").write_text("12345\n")  # a stale pid: nobody holds the lock
    (run / "checkpoints").mkdir()
    for file, step in (("step000002.ckpt", 2), ("step000004.ckpt", 4), ("last.ckpt", 4)):
        torch.save({"global_step": step, "state_dict": {}}, run / "checkpoints" / file)
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text(
        "clip/mean,epoch,loss/train,step\n40.5,,,0\n,0,1.5,0\n,0,1.25,1\n40.75,,,2\n,1,1.0,2\n,1,0.75,3\n"
    )
    writer = SummaryWriter(str(run / "tensorboard"))
    for step, value in ((0, 2.0), (2, 1.5), (4, 1.0)):
        writer.add_scalar("loss/val", value, step)
    writer.close()
    for step in (0, 2, 4):
        (run / "validation" / f"step_{step}").mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(run / "validation" / f"step_{step}" / "validation_64x64.png")
    (run / "lora").mkdir()
    save_file({"w": torch.zeros(2)}, run / "lora" / "pytorch_lora_weights.safetensors")
    (run / "result.json").write_text(json.dumps({"steps": 4, "metric": 0.9}))
    (run / "train.log").write_text("[INFO] - step 4: CLIP score mean 40.8\n")
    return run


def test_run_store_reads_a_cli_run_dir(tmp_path):
    run = _cli_run(tmp_path / "outputs")
    store = RunStore(tmp_path)
    (listed,) = store.runs()
    assert {k: listed[k] for k in ("id", "name", "status", "step", "max_steps", "source", "devices")} == {
        "id": "runs/demo",
        "name": "demo",
        "status": "finished",
        "step": 4,
        "max_steps": 4,
        "source": "cli",
        "devices": 1,
    }
    info = store.run("runs/demo")
    json.dumps(info, allow_nan=False)
    assert info["command"] == "python -m flux_lightning trainer.max_steps=4 logger=tensorboard_csv"
    assert info["metrics"]["loss/train"] == [[0, 1.5], [1, 1.25], [2, 1.0], [3, 0.75]]  # csv/metrics.csv
    assert info["metrics"]["clip/mean"] == [[0, 40.5], [2, 40.75]]
    assert info["metrics"]["loss/val"] == [[0, 2.0], [2, 1.5], [4, 1.0]]  # TensorBoard event file
    assert [(i["step"], i["files"]) for i in info["images"]] == [
        (s, [f"validation/step_{s}/validation_64x64.png"]) for s in (0, 2, 4)
    ]
    assert [(c["file"], c["step"]) for c in info["checkpoints"]] == [
        ("checkpoints/step000002.ckpt", 2),
        ("checkpoints/last.ckpt", 4),
        ("checkpoints/step000004.ckpt", 4),
    ]
    assert info["lora"] == "lora/pytorch_lora_weights.safetensors"
    assert "CLIP score" in info["log_tail"]
    assert store.file("runs/demo", info["lora"]) == (run / info["lora"]).resolve()
    with pytest.raises(KeyError):
        store.run("runs/nothing")


def test_a_cli_run_holding_its_lock_is_running_and_stop_sends_it_sigterm(tmp_path):
    job = tmp_path / "outputs" / "multirun" / "demo" / "2026-12-06_01-02-03" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- adapter.rank=2\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(job / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        store = RunStore(tmp_path)
        launcher = RunLauncher(store)
        run_id = "multirun/demo/2026-12-06_01-02-03/0"
        listed = by_id(store)[run_id]
        assert (listed["status"], listed["pid"], listed["source"]) == ("running", holder.pid, "cli")
        assert lock_holder(job) == holder.pid and (job / ".lock").exists()
        with pytest.raises(RunDirInUse, match=str(holder.pid)):  # a second process on the dir is refused
            launcher.launch(["adapter.rank=2", f"hydra.run.dir={job}"])
        assert launcher.stop(run_id)["pid"] == holder.pid
        assert holder.wait(timeout=10) == -15  # SIGTERM, as `kill <pid>` sends it
        assert by_id(store)[run_id]["status"] == "stopped"
        with pytest.raises(ProcessLookupError):
            launcher.stop(run_id)
    finally:
        holder.kill()
        holder.wait()


def _fake_python_and_workdir(tmp_path: Path) -> tuple[Path, Path]:
    """FAKE_PYTHON as an executable interpreter, and an empty launch folder."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    return fake, work


def test_launch_queues_on_busy_devices_survives_a_restart_and_stops_and_resumes(tmp_path):
    fake, work = _fake_python_and_workdir(tmp_path)
    gates = {n: tmp_path / f"gate_{n}" for n in "abc"}
    try:
        _queue_restart_stop_resume(work, fake, gates)
    finally:  # nothing outlives the test
        for gate in gates.values():
            gate.touch()
        for run in (work / "outputs" / "runs").glob("*"):
            pid = lock_holder(run)
            if pid:
                os.kill(pid, 9)


def _queue_restart_stop_resume(work: Path, fake: Path, gates: dict[str, Path]):
    store = RunStore(work)
    launcher = RunLauncher(store, python=str(fake))
    a = launcher.launch(["run_name=a", "trainer.max_steps=3"], devices=[0], env={"FAKE_GATE": gates["a"]})
    b = launcher.launch(["run_name=b"], devices=[0], env={"FAKE_GATE": gates["b"]})
    c = launcher.launch(["run_name=c"], devices=[1], env={"FAKE_GATE": gates["c"]})
    assert (a, b, c) == ("runs/a", "runs/b", "runs/c")
    wait_until(
        lambda: lock_holder(work / "outputs/runs/a") and lock_holder(work / "outputs/runs/c"), what="a and c to start"
    )
    runs = by_id(store)
    assert [runs[i]["status"] for i in (a, b, c)] == ["running", "queued", "running"]
    assert runs[a]["pid"] == lock_holder(work / "outputs/runs/a") and runs[a]["max_steps"] == 3
    assert runs[b]["source"] == "ui" and runs[b]["devices"] == [0]
    with pytest.raises(RunDirInUse):
        launcher.launch(["run_name=a"], devices=[2], env={"FAKE_GATE": gates["a"]})
    with pytest.raises(RunDirInUse):
        launcher.launch(["run_name=b"], devices=[2], env={"FAKE_GATE": gates["b"]})

    # a new store and launcher (the UI restarted) find the running processes and the queue again
    store = RunStore(work)
    launcher = RunLauncher(store, python=str(fake))
    runs = by_id(store)
    assert [runs[i]["status"] for i in (a, b, c)] == ["running", "queued", "running"]
    assert runs[a]["pid"] == lock_holder(work / "outputs/runs/a")
    assert launcher.poll() == []  # device 0 is still busy
    gates["a"].touch()
    wait_until(lambda: by_id(store)[a]["status"] == "finished", what="a to finish")
    assert launcher.poll() == [b]
    wait_until(lambda: lock_holder(work / "outputs/runs/b"), what="b to start")
    info = store.run(b)
    assert info["status"] == "running" and "started 0 run_name=b" in info["log_tail"]  # CUDA_VISIBLE_DEVICES=0
    assert info["command"] == "python -m flux_lightning run_name=b"

    launcher.stop(b)
    wait_until(lambda: by_id(store)[b]["status"] == "stopped", what="b to stop")
    info = store.run(b)
    assert info["exit_code"] == 143 and "stopped by SIGTERM" in info["log_tail"]
    assert [ck["file"] for ck in info["checkpoints"]] == ["checkpoints/last.ckpt"]
    assert by_id(store)[a]["exit_code"] == 0

    assert launcher.resume(b, "checkpoints/last.ckpt") == b  # device 0 is free again: starts at once
    wait_until(lambda: "resume_from_checkpoint=" in store.run(b)["log_tail"], what="b to resume")
    assert (
        f"resume_from_checkpoint={(work / 'outputs/runs/b/checkpoints/last.ckpt').resolve()}" in store.run(b)["command"]
    )
    for gate in gates.values():
        gate.touch()
    wait_until(lambda: all(r["status"] == "finished" for r in store.runs()), what="every run to finish")


def test_file_refuses_paths_outside_the_run_dir(tmp_path):
    run = tmp_path / "outputs" / "runs" / "r"
    (run / ".hydra").mkdir(parents=True)
    (run / "ok.txt").write_text("fine")
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    (run / "out.txt").symlink_to(secret)
    (run / "in.txt").symlink_to(run / "ok.txt")
    store = RunStore(tmp_path)
    assert store.file("runs/r", "ok.txt").read_text() == "fine"
    assert store.file("runs/r", "in.txt").read_text() == "fine"
    for bad in ("../../../secret.txt", "../r/../../../secret.txt", str(secret), "/etc/passwd", "out.txt"):
        with pytest.raises(PermissionError):
            store.file("runs/r", bad)
    with pytest.raises(PermissionError):
        store.file("../..", "secret.txt")
    with pytest.raises(FileNotFoundError):
        store.file("runs/r", "missing.png")
    with pytest.raises(PermissionError):
        store.data_file(run, "../../../secret.txt")


# -- the dataset check --------------------------------------------------------------------------
def test_check_dataset_reports_counts_buckets_captions_and_what_training_skips(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (512, 512), "red").save(folder / "a_red_square.png")
    Image.new("RGB", (768, 512), "blue").save(folder / "a_blue_strip.png")
    Image.new("RGB", (64, 64), "green").save(folder / "too_small.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.md").write_text("not data")

    report = check_dataset(folder, resolution=512)
    assert report["problems"] == []
    (backend,) = report["backends"]
    assert (backend["id"], backend["kind"], backend["images"]) == ("default", "image", 2)
    assert backend["buckets"] == [{"width": 512, "height": 512, "count": 2}]  # the shorthand's square crop
    assert {s["caption"] for s in backend["samples"]} == {"a red square", "a blue strip"}
    skipped = {Path(s["file"]).name: s["reason"] for s in backend["skipped"]}
    assert set(skipped) == {"broken.png", "too_small.png"}
    assert "cannot read image" in skipped["broken.png"]
    assert "dataset.minimum_image_size=128" in skipped["too_small.png"]
    assert [Path(i["file"]).name for i in backend["ignored"]] == ["notes.md"]

    backend_file = tmp_path / "multidatabackend.json"
    backend_file.write_text(
        json.dumps(
            [
                {
                    "id": "subject",
                    "instance_data_dir": "data",
                    "resolution": 256,
                    "crop": True,
                    "crop_aspect": "preserve",
                    "resolution_type": "pixel",
                    "caption_strategy": "instanceprompt",
                    "instance_prompt": "sks thing",
                },
                {"id": "text", "dataset_type": "text_embeds"},
            ]
        )
    )
    report = check_dataset(backend_file, workdir=tmp_path)
    (backend,) = report["backends"]
    assert (backend["id"], backend["images"]) == ("subject", 3)  # no minimum size on this backend
    assert {(b["width"], b["height"]) for b in backend["buckets"]} == {(256, 256), (384, 256)}
    assert {s["caption"] for s in backend["samples"]} == {"sks thing"}
    assert [Path(s["file"]).name for s in backend["skipped"]] == ["broken.png"]
    assert "does not exist" in check_dataset(tmp_path / "nowhere")["problems"][0]


# -- what you pick is what runs -----------------------------------------------------------------
def test_an_experiment_composes_its_own_groups_and_only_changes_are_overrides(tmp_path):
    from flux_lightning.ui.form_fields import experiments
    from flux_lightning.ui.forms import composed_form

    krea = composed_form({"experiment": "krea_lora"}, workdir=tmp_path)
    assert krea["choices"]["model"] == "krea" and krea["values"]["model.flavour"] == "krea"
    int8 = composed_form({"experiment": "krea_int8_lora"}, workdir=tmp_path)
    assert int8["choices"]["quantization"] != "none"
    # the page sends the experiment and what the user changed; the experiment's own choices stay out
    sent = compose_run({"experiment": "krea_int8_lora", **int8["choices"]}, {}, workdir=tmp_path, check_sources=False)
    assert sent["overrides"] == ["+experiment=krea_int8_lora"], sent["overrides"]
    assert (
        sent["values"]["model.quantization.base_model_precision"]
        == int8["values"]["model.quantization.base_model_precision"]
    )

    wizard = tmp_path / "my_configs"
    (wizard / "experiment").mkdir(parents=True)
    (wizard / "experiment" / "mine.yaml").write_text(
        "# @package _global_\n# my tiny run, written by hand\n#   python -m flux_lightning --config-dir my_configs +experiment=mine\n"
        "adapter:\n  rank: 3\n"
    )
    offered = {(e["name"], e["config_dir"]): e for e in experiments([wizard])}
    assert offered[("mine", str(wizard.resolve()))]["description"] == "my tiny run, written by hand"
    assert "FLUX.1-Krea-dev" in offered[("krea_lora", None)]["description"]
    mine = compose_run({"experiment": "mine"}, {}, workdir=tmp_path, check_sources=False, config_dir=wizard)
    assert (
        mine["overrides"][:2] == ["--config-dir=my_configs", "+experiment=mine"] and mine["values"]["adapter.rank"] == 3
    )
    assert mine["command"].startswith("python -m flux_lightning --config-dir=my_configs +experiment=mine")


def test_a_cli_run_with_a_config_dir_is_resumed_with_it(tmp_path):
    run = _cli_run(tmp_path / "outputs")
    (run / "result.json").unlink()  # interrupted after its last checkpoint
    (tmp_path / "cfgs").mkdir()
    (run / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    config_sources:\n    - {path: hydra.conf, schema: pkg, provider: hydra}\n"
        f"    - {{path: {tmp_path / 'cfgs'}, schema: file, provider: command-line}}\n"
    )
    store = RunStore(tmp_path)
    info = store.run("runs/demo")
    assert info["status"] == "interrupted"
    assert (
        info["command"]
        == f"python -m flux_lightning --config-dir={tmp_path / 'cfgs'} trainer.max_steps=4 logger=tensorboard_csv"
    )
    seen = []

    def refuse(args):
        seen.append(args)
        raise PermissionError("refused")

    with pytest.raises(PermissionError):  # the server's rule sees the --config-dir before anything starts
        RunLauncher(store).resume("runs/demo", check=refuse)
    assert seen[0][0] == f"--config-dir={tmp_path / 'cfgs'}"
    assert store.runs()[0]["status"] == "interrupted"


def test_cpu_runs_queue_one_at_a_time_by_default(tmp_path):
    fake, work = _fake_python_and_workdir(tmp_path)
    gates = {n: tmp_path / f"gate_{n}" for n in "ab"}
    try:
        store = RunStore(work)
        launcher = RunLauncher(store, python=str(fake))
        a = launcher.launch(["run_name=a"], devices=[], env={"FAKE_GATE": gates["a"]})
        b = launcher.launch(["run_name=b"], devices=[], env={"FAKE_GATE": gates["b"]})
        wait_until(lambda: lock_holder(work / "outputs/runs/a"), what="a to start")
        assert [by_id(store)[i]["status"] for i in (a, b)] == ["running", "queued"]
        assert launcher.poll() == []
        gates["a"].touch()
        wait_until(lambda: by_id(store)[a]["status"] == "finished", what="a to finish")
        assert launcher.poll() == [b]
        two = RunLauncher(RunStore(work), python=str(fake), max_cpu_runs=2)
        c = two.launch(["run_name=c"], devices=[], env={"FAKE_GATE": gates["b"]})
        assert by_id(two.store)[c]["status"] == "running"  # a second slot
    finally:
        for gate in gates.values():
            gate.touch()
        for run in (work / "outputs" / "runs").glob("*"):
            pid = lock_holder(run)
            if pid:
                os.kill(pid, 9)


def test_check_dataset_takes_the_caption_strategy_and_reports_notes(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (256, 256), "red").save(folder / "img_001.png")
    (folder / "img_001.txt").write_text("a red square, photographed")
    (folder / "orphan.txt").write_text("a caption file without an image")
    report = check_dataset(folder, resolution=256, caption_strategy="textfile")
    (backend,) = report["backends"]
    assert [s["caption"] for s in backend["samples"]] == ["a red square, photographed"]
    assert check_dataset(folder, resolution=256)["backends"][0]["samples"][0]["caption"] == "img 001"
    shown = report["notes"] + [i["file"] + " " + i["reason"] for i in backend["ignored"]]
    assert any("orphan.txt" in line for line in shown), shown
