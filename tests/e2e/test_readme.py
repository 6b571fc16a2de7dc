"""The README cannot promise what the CLI does not do: every command in it is run here (or by the
named test), and every knob of its command-line table exists in the composed config.

A command needing the Hub and a GPU is run as written, offline: it must stop within seconds with one
clear error line (as the README says), never a traceback. A new command in the README fails
:func:`test_every_readme_command_has_a_runner` until it is given one below.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flux_lightning.run.train import config_dir

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """Shell commands of the README: lines of ```bash blocks (``\\`` continuations joined, ``&&``
    split) and inline code spans that start with ``python -m``."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            out += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    out += [" ".join(c.split()) for c in re.findall(r"`(python -m [^`]+)`", README)]
    return list(dict.fromkeys(out))


def _run(cmd: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = shlex.split(cmd)
    if args[:2] == ["python", "-m"]:
        args[0] = sys.executable
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ci_runs_it(cmd: str, tmp_path: Path) -> None:
    assert cmd in (REPO / ".ci" / "run").read_text(), f"{cmd!r} is the README's; .ci/run must run it"


def _covered_by(test_file: str, test_name: str):
    def check(cmd: str, tmp_path: Path) -> None:
        assert f"def {test_name}(" in (REPO / "tests" / test_file).read_text(), f"{test_file}::{test_name} is gone"

    return check


def _prints_help(cmd: str, tmp_path: Path) -> None:
    out = _run(cmd, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "== Config groups (group=option) ==" in out.stdout and "experiment: " in out.stdout


def _prints_the_config(cmd: str, tmp_path: Path) -> None:
    out = _run(cmd, tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.model.flavour == "tiny" and cfg.run_name


def _needs_hub_and_gpu(cmd: str, tmp_path: Path) -> None:
    """Marked as needing the Hub (gated weights) and a GPU: offline it stops within seconds with one
    error line naming the fix, before anything loads."""
    start = time.monotonic()
    out = _run(cmd, tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert time.monotonic() - start < 120
    assert "Traceback" not in out.stderr
    errors = out.stderr[out.stderr.index("error: ") :]
    assert "model.pretrained_model_name_or_path" in errors and "dataset.instance_data_dir" in errors


def _simpletuner(cmd: str, tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    settings = {"--model_flavour": "krea", "--lora_rank": 4, "--learning_rate": 2e-4, "--max_train_steps": 7}
    (tmp_path / "config" / "config.json").write_text(json.dumps(settings))
    out = _run(cmd.replace("[more overrides]", "--cfg job"), tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert (cfg.model.flavour, cfg.adapter.rank, cfg.optimizer.lr, cfg.trainer.max_steps) == ("krea", 4, 2e-4, 7)


def _lora_tool(test_name: str):
    """The README's LoRA-tool command parses with the tool's own parser (every verb and flag exists) and
    the named test of tests/lora_tools/test_lora_tools.py runs that verb on real files."""

    def check(cmd: str, tmp_path: Path) -> None:
        from flux_lightning.lora_tools.cli import parser

        args = shlex.split(cmd)
        assert args[:3] == ["python", "-m", "flux_lightning.lora_tools"], cmd
        parsed = parser().parse_args(args[3:])
        assert parsed.verb in test_name
        _covered_by("lora_tools/test_lora_tools.py", test_name)(cmd, tmp_path)

    return check


def _runs_a_wizard_experiment(cmd: str, tmp_path: Path) -> None:
    """The README's run of a wizard-written experiment: the file in the user's config dir is found
    through ``--config-dir`` and composed with the project's config."""
    from flux_lightning.data.demo import make_demo_dataset
    from flux_lightning.wizard.configure import write_experiment
    from flux_lightning.wizard.plan import Plan

    data = make_demo_dataset(tmp_path / "data", count=4, size=32)
    plan = Plan(name="my_lora", flavour="tiny", data_dir=str(data), image_count=4, resolution=64, lr=3e-4, max_steps=7)
    write_experiment(plan, tmp_path / "flux_lightning_configs")
    out = _run(cmd + " --cfg job", tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert (cfg.model.flavour, cfg.optimizer.lr, cfg.trainer.max_steps) == ("tiny", 3e-4, 7)
    assert cfg.dataset.instance_data_dir == str(data)


def _ui_extra(cmd: str, tmp_path: Path) -> None:
    """The ``ui`` extra names the server's packages, and ``dev`` (what CI installs) has them too."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", dep)[0] for dep in extras["ui"]}
    assert {"starlette", "uvicorn"} <= names
    assert names <= {re.split(r"[<>=\[ ]", dep)[0] for dep in extras["dev"]}


def _serves_the_ui(cmd: str, tmp_path: Path) -> None:
    """The UI command serves the page on the port it prints (a free one here, not 8001); the printed
    URL carries the token, and a request without it is refused."""
    import select
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = shlex.split(re.sub(r"--port \d+", "", cmd)) + ["--port", str(port)]
    args[0] = sys.executable
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("FLUX_LIGHTNING_UI_TOKEN", None)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "the UI printed no URL within 120 s"
        line = proc.stdout.readline()
        url = line.split("http://", 1)[1].split()[0]
        assert f":{port}/" in url, line
        base = f"http://127.0.0.1:{port}"

        def get(path: str, token: str | None = None) -> int:
            request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"} if token else {})
            for _ in range(100):  # uvicorn binds just after the line is printed
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        return response.status
                except urllib.error.HTTPError as err:
                    return err.code
                except urllib.error.URLError:
                    time.sleep(0.1)
            raise AssertionError(f"nothing answers on {base}")

        token = url.split("?token=", 1)[1]  # on loopback too: another local user has no way in without it
        assert get("/api/runs") == 401 and get("/api/runs", token) == 200 and get("/", token) == 200
    finally:
        proc.terminate()
        proc.wait(30)


# README command -> how it is proven (exact text after whitespace normalisation)
RUNNERS = {
    'pip install -e ".[dev]"': _ci_runs_it,
    "python -m pytest -q": _ci_runs_it,
    "ATEN_CPU_CAPABILITY=default python -m pytest -q -m numerics": _ci_runs_it,
    "ruff check .": _ci_runs_it,
    "ruff format --check .": _ci_runs_it,
    "python -m flux_lightning": _covered_by("e2e/test_train.py", "test_default_run_trains_the_tiny_demo_in_minutes"),
    "python -m flux_lightning adapter.rank=8": _covered_by(
        "run/test_run_identity.py", "test_a_changed_command_after_a_finished_demo_is_refused_not_called_finished"
    ),
    "python -m flux_lightning --help": _prints_help,
    "python -m flux_lightning --cfg job": _prints_the_config,
    "python -m flux_lightning +experiment=krea_lora dataset.instance_data_dir=/path/to/images "
    'dataset.instance_prompt="your trigger phrase"': _needs_hub_and_gpu,
    "python -m flux_lightning -m +experiment=krea_lora optimizer.lr=1e-4,4e-4 adapter.rank=4,16": _needs_hub_and_gpu,
    "python -m flux_lightning simpletuner_config=config/config.json [more overrides]": _simpletuner,
    "python -m flux_lightning +experiment=krea_lora trainer=ddp": _needs_hub_and_gpu,
    "python -m flux_lightning trainer=ddp trainer.accelerator=cpu trainer.devices=2 dataset.batch_size=2": _covered_by(
        "e2e/test_ddp.py", "test_the_readmes_ddp_command_ends_cleanly_on_both_ranks_and_a_rerun_is_finished"
    ),
    "torchrun --nnodes=2 --nproc-per-node=4 --node-rank=0 --master-addr=node0 --master-port=29500 -m flux_lightning "
    "+experiment=krea_lora trainer=ddp trainer.devices=4 trainer.num_nodes=2": _covered_by(
        "e2e/test_launchers.py", "test_torchrun_ranks_on_two_nodes_train_one_run"
    ),
    "python -m flux_lightning.wizard": _covered_by(
        "wizard/test_configure.py", "test_wizard_in_a_terminal_writes_an_experiment_that_trains"
    ),
    "python -m flux_lightning --config-dir flux_lightning_configs +experiment=my_lora": _runs_a_wizard_experiment,
    'pip install -e ".[ui]"': _ui_extra,
    "python -m flux_lightning.ui": _serves_the_ui,
    "python -m flux_lightning.ui --host 0.0.0.0 --port 8001": _serves_the_ui,
    "python -m flux_lightning module._target_=my_pkg.MyModule data._target_=my_pkg.MyData": _covered_by(
        "e2e/test_entry_point.py", "test_a_users_module_and_datamodule_subclasses_are_swapped_in_from_the_command_line"
    ),
    "python -m flux_lightning.lora_tools merge --base /path/to/FLUX.1-dev --lora pytorch_lora_weights.safetensors "
    "--out FLUX.1-dev-merged --scale 1.0": _lora_tool("test_merge_equals_the_pipeline_with_the_lora_loaded"),
    "python -m flux_lightning.lora_tools resize --lora pytorch_lora_weights.safetensors --rank 8 --out lora_r8.safetensors": _lora_tool(
        "test_resize_is_the_best_rank_r_approximation_and_prints_its_energy"
    ),
    "python -m flux_lightning.lora_tools convert --lora pytorch_lora_weights.safetensors --to comfyui "
    "--out lora_comfyui.safetensors": _lora_tool("test_converted_files_apply_in_comfyui_as_the_update"),
}


def test_every_readme_command_has_a_runner():
    missing = [c for c in readme_commands() if c not in RUNNERS]
    assert not missing, f"README commands no test runs (add them to RUNNERS): {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command(cmd, tmp_path):
    if cmd not in RUNNERS:
        pytest.fail(f"no runner for {cmd!r}")
    if "/path/to/images" in cmd:  # the README's placeholder folder must not exist by accident
        assert not Path("/path/to/images").exists()
    RUNNERS[cmd](cmd, tmp_path)


def readme_knobs() -> list[str]:
    """Every override the README names: the first column of its command-line table, and every
    ``key=value`` token of an inline code span in its prose."""
    spans = []
    for row in re.findall(r"^\| (`.+?) \|", README, re.M):
        spans += [s.strip("'") for s in re.findall(r"`([^`]+)`", row)]
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        spans += [t.strip("'") for t in span.split() if re.match(r"^'?[+~]?[a-z_][\w.]*=", t)]
    return list(dict.fromkeys(spans))


def test_the_knob_table_names_each_override_once():
    rows = re.findall(r"^\| (`.+?) \|", README, re.M)
    named = [s for row in rows for s in re.findall(r"`([^`]+)`", row)]
    assert len(rows) > 30
    assert not sorted({s for s in named if named.count(s) > 1}), "an override has two rows in the README's table"


# named in the README as what fails
MEANT_TO_FAIL = {"adapter.rnk=4"}


def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", *overrides]
        )


def _composes(tmp_path, override: str) -> bool:
    try:
        _compose(tmp_path, override)
        return True
    except Exception:  # noqa: BLE001 - the caller reports the override
        return False


def _placeholder(value: str) -> bool:
    return "<" in value or value in ("...", "N", "M")


def test_every_knob_in_the_readme_exists(tmp_path):
    knobs = readme_knobs()
    assert len(knobs) > 60
    cfg = _compose(tmp_path)
    groups = {p.name for p in Path(config_dir()).iterdir() if p.is_dir()}
    bad = []
    for knob in knobs:
        key, eq, value = knob.partition("=")
        if key == "simpletuner_config" or key.startswith("hydra."):  # argv expansion; Hydra's own
            continue
        if knob in MEANT_TO_FAIL:
            ok = not _composes(tmp_path, knob)
        elif eq and _placeholder(value):  # `group=<choice>`, `trainer.devices=N`
            ok = key.lstrip("+") in groups or OmegaConf.select(cfg, key, default="<missing>") != "<missing>"
        elif "<" in key or key.endswith(".*"):  # `callbacks.<name>=null`, `callbacks.validation.*`
            ok = OmegaConf.select(cfg, key.split(".<")[0].removesuffix(".*")) is not None
        elif eq:
            alternatives = value.split("|") if "[" not in value else [value]
            ok = all(_composes(tmp_path, f"{key}={v.split(',')[0] if '[' not in v else v}") for v in alternatives)
        else:
            ok = OmegaConf.select(cfg, key, default="<missing>") != "<missing>"
        if not ok:
            bad.append(knob)
    assert not bad, f"README knobs the config does not have: {bad}"
