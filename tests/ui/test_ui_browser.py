"""The web UI driven by a real headless browser (Debian's chromium through Playwright; no browser is
downloaded): compose a tiny run, see a validation problem next to its field, fix it, launch, watch
the run finish, see the loss curve and the validation images, download the LoRA through the page and
load it with diffusers; pick a built-in experiment and a wizard-written one (the form follows them,
the command is what runs); resume a CLI run made with ``--config-dir``. Also takes the README's
screenshots (``docs/screenshots/<page>.png``), which are rewritten only with
``FLUX_LIGHTNING_SCREENSHOTS=1``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from ..conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = REPO / "docs" / "screenshots"
# the run: the embedded tiny demo, 4 steps, validation images at steps 0, 2 and 4, no eval split
RUN_OVERRIDES = [
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "callbacks.validation.every_n_steps=2",
    "callbacks.validation.validation_num_inference_steps=2",
    "callbacks.eval_loss=null",
    "callbacks.adapter_export.dtype=fp32",
]

TOKEN = "browser-test-token"
pytestmark = pytest.mark.slow


def _browser_or_skip():
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (Debian: apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright (the Python package) is not installed: pip install -e '.[dev]'")
    pytest.importorskip("uvicorn", reason="the web UI needs the ui extra: pip install -e '.[ui]'")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path, cache_root, tiny_folder, monkeypatch):
    """The UI on a free loopback port, runs under tmp_path, sharing the session's model/data caches."""
    sync_playwright = _browser_or_skip()
    import uvicorn

    from flux_lightning.ui.server import create_app

    # the runs are `python -m flux_lightning` subprocesses: they find this checkout and the caches
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FLUX_LIGHTNING_CACHE", str(cache_root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    data.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    _wizard_experiment(work)  # <workdir>/flux_lightning_configs: an experiment dir the UI offers
    port = _free_port()
    app = create_app(work, token=TOKEN, data_roots=[data])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the UI server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", data, sync_playwright
    finally:
        server.should_exit = True
        thread.join(10)


def _wizard_experiment(work: Path) -> Path:
    """``<work>/flux_lightning_configs/experiment/my_lora.yaml`` as the wizard writes it (tiny, 64 px)."""
    from flux_lightning.data.demo import make_demo_dataset
    from flux_lightning.wizard.configure import write_experiment
    from flux_lightning.wizard.plan import Plan

    data = make_demo_dataset(work / "wizard_data", count=4, size=32)
    plan = Plan(name="my_lora", flavour="tiny", data_dir=str(data), image_count=4, resolution=64, lr=3e-4, max_steps=40)
    return write_experiment(plan, work / "flux_lightning_configs")


def _shot(page, name: str, full_page: bool = True) -> None:
    """``full_page=False``: the window as seen (the New-run form's sticky Validate/Launch bar at its foot)."""
    if os.environ.get("FLUX_LIGHTNING_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def _demo_images(folder: Path) -> None:
    from PIL import Image, ImageDraw

    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle")]):
        size = (96, 64) if i == 1 else (64, 64)
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((12, 12, size[0] - 12, 52), fill=colour)
        image.save(folder / f"a {colour} {shape}.png")  # the caption is the file name (caption_strategy)
    (folder / "broken.png").write_bytes(b"not an image")


def test_compose_validate_launch_watch_and_download_a_tiny_run(served, tiny_folder, tmp_path):
    url, data, sync_playwright = served
    _demo_images(data)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + f"/?token={TOKEN}")  # the printed URL: the page keeps the token as a cookie

            # New run: a bad field is reported next to it, with the command line
            rank = page.get_by_test_id("field-adapter-rank")
            rank.fill("0")
            page.get_by_test_id("extra-overrides").fill("\n".join(RUN_OVERRIDES))
            page.get_by_test_id("validate").click()
            problem = page.get_by_test_id("problem-adapter-rank")
            problem.filter(has_text="adapter.rank").wait_for()
            assert "adapter.rank=0" in page.get_by_test_id("command").inner_text()
            _shot(page, "new_run", full_page=False)
            rank.fill("4")
            page.get_by_test_id("validate").click()
            page.get_by_test_id("compose-status").filter(has_text="ready to launch").wait_for()
            assert problem.inner_text() == ""
            command = page.get_by_test_id("command").inner_text()
            assert "adapter.rank=4" in command and "trainer.max_steps=4" in command

            # Dataset check on a data root: counts, buckets, captions, the skipped file and why
            page.get_by_test_id("tab-dataset").click()
            page.get_by_test_id("dataset-path").fill(str(data))
            page.get_by_test_id("dataset-resolution").fill("64")
            page.get_by_test_id("dataset-check").click()
            page.get_by_test_id("backend-images").first.wait_for()
            assert page.get_by_test_id("backend-images").first.inner_text() == "3"
            assert "broken.png" in page.get_by_test_id("skipped").first.inner_text()
            assert "a red circle" in page.get_by_test_id("dataset-result").inner_text()
            page.wait_for_function(
                "[...document.querySelectorAll('.sample img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            _shot(page, "dataset_check")

            # Hardware: this machine's accelerators and the auto/manual/off choice
            page.get_by_test_id("tab-hardware").click()
            page.get_by_test_id("hw-summary").wait_for()
            expected = "CPU" if not torch.cuda.is_available() else "GPU"
            assert expected in page.get_by_test_id("hw-summary").inner_text()
            _shot(page, "hardware")
            page.get_by_test_id("hw-off").check()
            page.get_by_test_id("hw-summary").filter(has_text="CPU").wait_for()

            # Launch -> the Runs page follows the run to its end
            page.get_by_test_id("tab-new").click()
            page.get_by_test_id("launch").click()
            page.get_by_test_id("page-runs").wait_for()
            status = page.get_by_test_id("run-status")
            status.filter(has_text="finished").wait_for(timeout=240_000)  # (a busy 2-core machine: minutes)
            page.locator("[data-testid^=run-row-] .badge").filter(has_text="finished").wait_for()
            page.locator("[data-testid=loss-chart] path.series-train").wait_for()
            page.locator("[data-testid=validation-step-4] img").first.wait_for()
            page.wait_for_function(
                "[...document.querySelectorAll('#validation-images img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            steps = page.locator("[data-testid^=validation-step-]").evaluate_all(
                "els => els.map(e => e.dataset.testid)"
            )
            assert {"validation-step-0", "validation-step-2", "validation-step-4"} <= set(steps)
            assert page.get_by_test_id("checkpoints").count() == 1
            assert page.get_by_test_id("log-tail").inner_text().strip()
            _shot(page, "runs")

            # the LoRA, downloaded through the page
            with page.expect_download() as info:
                page.get_by_test_id("lora-download").click()
            lora = tmp_path / "downloaded" / "pytorch_lora_weights.safetensors"
            lora.parent.mkdir()
            info.value.save_as(lora)
            assert not errors, errors
        finally:
            browser.close()
    _loads_in_diffusers_and_changes_the_output(tiny_folder, lora)


def _loads_in_diffusers_and_changes_the_output(tiny_folder: Path, lora: Path) -> None:
    from diffusers import FluxPipeline

    from flux_lightning.training.flow import image_ids, text_ids

    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 32, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([1.0]),
        img_ids=image_ids(8, 8),
        txt_ids=text_ids(32),
        return_dict=False,
    )
    pipe = FluxPipeline.from_pretrained(tiny_folder)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(lora))
        adapted = pipe.transformer(**inputs)[0]
    assert pipe.get_list_adapters()["transformer"], "no LoRA was loaded into the transformer"
    assert not torch.allclose(base, adapted), "the downloaded LoRA does not change the transformer's output"


def _composed(command: str, workdir: Path):
    """The config ``command`` (as the page shows it) composes to, run in ``workdir``."""
    import shlex

    from flux_lightning.config.compose import composed

    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "flux_lightning"], command
    with composed(argv[3:], workdir=workdir) as cfg:
        return cfg


def test_experiments_recompose_the_form_and_a_cli_config_dir_run_resumes(served, tmp_path):
    import signal
    import subprocess
    import sys

    url, _, sync_playwright = served
    work = tmp_path / "work"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + f"/?token={TOKEN}")
            command = page.get_by_test_id("command")

            # a built-in experiment: the groups and fields follow it; only what the user changes is sent
            page.get_by_test_id("experiment").select_option("krea_lora")
            page.wait_for_function("document.querySelector('[data-testid=option-model]').value === 'krea'")
            assert page.get_by_test_id("field-model-flavour").input_value() == "krea"
            assert "Krea" in page.locator("#experiment-doc").inner_text()
            command.filter(has_text="+experiment=krea_lora").wait_for()
            page.wait_for_timeout(800)  # the preview settles
            shown = command.inner_text()
            assert "model=" not in shown and "dataset=" not in shown and "optimizer=" not in shown, shown
            cfg = _composed(shown, work)
            assert (cfg.model.flavour, cfg.adapter.rank) == ("krea", 16)
            page.get_by_test_id("option-optimizer").select_option("prodigy")  # a change is sent
            command.filter(has_text="optimizer=prodigy").wait_for()
            assert _composed(command.inner_text(), work).optimizer.name == "prodigy"

            # a wizard-written experiment from <workdir>/flux_lightning_configs
            page.get_by_test_id("experiment").select_option(label="my_lora")
            command.filter(has_text="+experiment=my_lora").wait_for()
            page.wait_for_function("document.querySelector('[data-testid=field-trainer-max_steps]').value === '40'")
            page.wait_for_timeout(800)
            shown = command.inner_text()
            assert shown.startswith(
                "python -m flux_lightning --config-dir=flux_lightning_configs +experiment=my_lora"
            ), shown
            assert "optimizer=prodigy" not in shown  # the new experiment's own choice
            cfg = _composed(shown, work)
            assert (cfg.model.flavour, cfg.trainer.max_steps, cfg.optimizer.lr) == ("tiny", 40, 3e-4)
            page.get_by_test_id("validate").click()
            page.get_by_test_id("compose-status").filter(has_text="ready to launch").wait_for(timeout=60_000)

            # a CLI run of it (--config-dir), stopped from the terminal, resumed from the page
            cli = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flux_lightning",
                    "--config-dir",
                    "flux_lightning_configs",
                    "+experiment=my_lora",
                    "run_name=cli",
                    "trainer.log_every_n_steps=1",
                    "callbacks.validation.every_n_steps=1000",
                ],
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                page.get_by_test_id("tab-runs").click()
                page.get_by_test_id("run-row-runs-cli").click()
                page.get_by_test_id("run-status").filter(has_text="running").wait_for(timeout=240_000)
                page.wait_for_function(
                    "parseInt(document.querySelector('[data-testid=run-step]').textContent) >= 1", timeout=240_000
                )
            finally:
                cli.send_signal(signal.SIGTERM)  # as Ctrl+C or a scheduler would
                assert cli.wait(120) == 128 + signal.SIGTERM
            page.get_by_test_id("run-status").filter(has_text="interrupted").wait_for()
            assert "--config-dir flux_lightning_configs" not in page.get_by_test_id("run-command").inner_text()
            assert "--config-dir=" in page.get_by_test_id("run-command").inner_text()
            page.get_by_test_id("resume").click()
            page.get_by_test_id("run-status").filter(has_text="starting").wait_for(timeout=5_000)  # at once
            page.get_by_test_id("run-status").filter(has_text="finished").wait_for(timeout=240_000)
            assert page.get_by_test_id("resume").is_disabled()  # nothing to resume in a finished run
            assert "(step 40)" in page.get_by_test_id("lora-download").inner_text()
            page.get_by_test_id("log-attempt").wait_for()  # the CLI attempt and the page's
            assert not errors, errors
        finally:
            browser.close()
