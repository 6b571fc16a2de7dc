"""config/compose.py: the one in-process composition, checked against the command line itself."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, SearchPathException
from omegaconf import OmegaConf

from flux_lightning.config.compose import composed

REPO = Path(__file__).resolve().parents[2]


def _experiment_dir(workdir: Path) -> Path:
    """``<workdir>/cfgs/experiment/mine.yaml``: another optimizer option and an adapter rank."""
    folder = workdir / "cfgs" / "experiment"
    folder.mkdir(parents=True)
    (folder / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /optimizer: prodigy\nadapter:\n  rank: 7\n"
    )
    return workdir / "cfgs"


def _cli_job_config(args: list[str], cwd: Path) -> dict:
    """What ``python -m flux_lightning <args> --cfg job`` prints, run in ``cwd``."""
    out = subprocess.run(
        [sys.executable, "-m", "flux_lightning", *args, "--cfg", "job"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_it_composes_what_the_command_line_composes(tmp_path):
    """The same arguments, the CLI's --config-dir flag included, give the same job config."""
    _experiment_dir(tmp_path)
    args = ["--config-dir", "cfgs", "+experiment=mine", "trainer.max_steps=5", "run_name=cmp", "dataset.resolution=96"]
    with composed(args, workdir=tmp_path) as cfg:
        ours = yaml.safe_load(OmegaConf.to_yaml(cfg))
    assert "hydra" not in ours
    assert (ours["adapter"]["rank"], ours["optimizer"]["name"], ours["trainer"]["max_steps"]) == (7, "prodigy", 5)
    assert ours == _cli_job_config(args, tmp_path)


def test_it_restores_the_callers_hydra_state_and_cwd(tmp_path):
    caller = tmp_path / "caller_conf"
    caller.mkdir()
    (caller / "caller.yaml").write_text("marker: 1\n")
    work = tmp_path / "work"
    work.mkdir()
    cwd, before = os.getcwd(), HydraConfig.instance().cfg
    try:
        with initialize_config_dir(config_dir=str(caller), version_base="1.3", job_name="caller"):
            HydraConfig.instance().set_config(compose("caller", return_hydra_config=True))
            with composed(["run_name=mine"], workdir=work, hydra_node=True) as cfg:
                assert os.getcwd() == str(work.resolve())
                assert cfg.hydra.runtime.output_dir == str(work.resolve() / "outputs" / "runs" / "mine")
                assert HydraConfig.get().job.name == "train"  # the run's node while composing
                assert cfg.paths.output_dir == cfg.hydra.runtime.output_dir  # ${hydra:...} resolves here
            assert os.getcwd() == cwd
            assert HydraConfig.get().job.name == "caller"
            assert compose("caller").marker == 1  # the caller's own Hydra, initialised on its own dir
            with pytest.raises(HydraException), composed(["model=no_such_flavour"], workdir=work):
                pass
            with pytest.raises(RuntimeError, match="in the block"), composed([], workdir=work):
                raise RuntimeError("an error in the block")
            assert os.getcwd() == cwd and HydraConfig.get().job.name == "caller"
            assert compose("caller").marker == 1
        assert not GlobalHydra.instance().is_initialized()
    finally:
        HydraConfig.instance().cfg = before
        os.chdir(cwd)


@pytest.mark.parametrize(
    "flag", [["--config-dir", "cfgs"], ["--config-dir=cfgs"], ["-cd", "cfgs"], ["-cd=cfgs"], ["--config-dir", "ABS"]]
)
def test_config_dir_flags_become_the_search_path(tmp_path, flag):
    folder = _experiment_dir(tmp_path)
    flag = [str(folder) if f == "ABS" else f for f in flag]
    with composed([*flag, "+experiment=mine"], workdir=tmp_path, hydra_node=True) as cfg:
        assert (cfg.adapter.rank, cfg.optimizer.name) == (7, "prodigy")
        assert f"file://{folder}" in list(cfg.hydra.searchpath)
    with pytest.raises(HydraException, match="mine"), composed(["+experiment=mine"], workdir=tmp_path):
        pass  # without the flag the experiment is not found


def test_a_missing_config_dir_or_another_flag_is_named(tmp_path):
    with (
        pytest.raises(SearchPathException, match=str(tmp_path / "nowhere")),
        composed(["--config-dir", "nowhere"], workdir=tmp_path),
    ):
        pass
    with pytest.raises(ValueError, match="^-m: "), composed(["-m", "seed=1,2"], workdir=tmp_path):
        pass
    with pytest.raises(ValueError, match="--config-dir needs a folder"), composed(["--config-dir"], workdir=tmp_path):
        pass


def test_threads_compose_one_at_a_time(tmp_path):
    """A server composes from worker threads: each composition sees its own run and workdir."""
    seen, errors = {}, []

    def work(n: int):
        folder = tmp_path / f"w{n}"
        folder.mkdir()
        try:
            for i in range(3):
                with composed([f"run_name=r{n}_{i}"], workdir=folder, hydra_node=True) as cfg:
                    seen[(n, i)] = (cfg.hydra.runtime.output_dir, os.getcwd())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert seen == {
        (n, i): (
            str((tmp_path / f"w{n}").resolve() / "outputs" / "runs" / f"r{n}_{i}"),
            str((tmp_path / f"w{n}").resolve()),
        )
        for n in range(4)
        for i in range(3)
    }
