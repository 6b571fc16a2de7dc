"""A built wheel carries the Hydra config tree, and the installed package finds it."""

import subprocess
import sys
import zipfile

import pytest

from ..conftest import REPO
from ..support.cli import flux_lightning


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("flux_lightning-*.whl"))


def test_wheel_ships_the_config_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        n.removeprefix("flux_lightning/conf/")
        for n in names
        if n.startswith("flux_lightning/conf/") and n.endswith(".yaml")
    }
    in_repo = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == in_repo and "train.yaml" in shipped


def test_installed_wheel_composes_its_own_config(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from flux_lightning.run.train import config_dir; print(config_dir())"
    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found == str(site / "flux_lightning" / "conf")
    shown = subprocess.run(
        flux_lightning("--cfg", "job", "model=krea"),
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "flavour: krea" in shown.stdout
