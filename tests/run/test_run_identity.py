"""A run dir knows the config it was trained with (``run_config.yaml``): a changed command is refused
with the differing keys instead of resuming, or skipping as finished, another run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from flux_lightning.config.schema import config_dir, register
from flux_lightning.errors import ConfigError
from flux_lightning.run import run_identity

from ..support.cli import run_command

REPO = Path(__file__).resolve().parents[2]
register()


def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", *overrides]
        )


def _started(tmp_path, *overrides) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    run_identity.record(run, run_identity.identity(_compose(tmp_path, *overrides)))
    return run


def test_what_changes_the_weights_is_recorded_and_what_does_not_is_not(tmp_path):
    ident = run_identity.identity(_compose(tmp_path))
    for key in (
        "adapter.rank",
        "optimizer.lr",
        "dataset.instance_data_dir",
        "seed",
        "timesteps.weighting_scheme",
        "lr_scheduler.name",
        "loss.loss_type",
        "trainer.accumulate_grad_batches",
        "model.flavour",
    ):
        assert key in ident, key
    for key in (
        "trainer.max_steps",
        "trainer.log_every_n_steps",
        "model.cache_dir",
        "dataset.cache_dir",
        "run_name",
        "resume_from_checkpoint",
        "paths.output_dir",
    ):
        assert key not in ident, key
    assert not any(k.startswith(("callbacks.", "logger.", "paths.")) for k in ident)
    same = run_identity.identity(
        _compose(
            tmp_path, "trainer.max_steps=5000", "trainer.log_every_n_steps=1", "callbacks.validation=null", "logger=csv"
        )
    )
    assert same == ident


def test_a_changed_rank_or_data_folder_is_refused_naming_the_keys_and_the_ways_on(tmp_path):
    run = _started(tmp_path, "dataset=local", f"dataset.instance_data_dir={tmp_path}/a")
    changed = _compose(tmp_path, "dataset=local", f"dataset.instance_data_dir={tmp_path}/b", "adapter.rank=8")
    with pytest.raises(ConfigError) as err:
        run_identity.check(run, changed, str(run / "last.ckpt"))
    line = str(err.value)
    assert "\n" not in line
    assert "adapter.rank (16 -> 8)" in line and "dataset.instance_data_dir (" in line
    assert f"{tmp_path.name}/a -> ..." in line and f"{tmp_path.name}/b)" in line
    assert "run_name=<new>" in line and "resume_from_checkpoint=null" in line
    assert "resume.allow_changes=[adapter.rank,dataset.instance_data_dir]" in line


def test_allowed_changes_resume_and_are_recorded(tmp_path):
    run = _started(tmp_path)
    more = _compose(tmp_path, "optimizer.lr=5e-4", "trainer.max_steps=900", "resume.allow_changes=[optimizer]")
    run_identity.check(run, more, "x.ckpt")  # no error: optimizer.* allowed, max_steps is no identity
    assert run_identity.recorded(run)["optimizer.lr"] == 5e-4
    run_identity.check(run, _compose(tmp_path, "optimizer.lr=5e-4"), "x.ckpt")  # the same command again
    with pytest.raises(ConfigError, match=r"seed \(42 -> 7\)"):
        run_identity.check(
            run, _compose(tmp_path, "optimizer.lr=5e-4", "seed=7", "resume.allow_changes=[optimizer]"), "x.ckpt"
        )


def test_a_backend_files_content_is_part_of_the_identity(tmp_path):
    backends = tmp_path / "multidatabackend.json"
    backends.write_text('[{"id": "a", "instance_data_dir": "/data/a"}]')
    run = _started(tmp_path, f"dataset.backend_file={backends}")
    backends.write_text('[{"id": "a", "instance_data_dir": "/data/b"}]')
    with pytest.raises(ConfigError, match="dataset.backend_file_sha256"):
        run_identity.check(run, _compose(tmp_path, f"dataset.backend_file={backends}"), "x.ckpt")


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_changed_command_after_a_finished_demo_is_refused_not_called_finished(tmp_path):
    base = run_command(
        tmp_path / "run",
        tmp_path / "cache",
        2,
        "callbacks.clip_score=null",
        "callbacks.eval_loss=null",
        "callbacks.model_card=null",
        "logger=csv",
        "callbacks.validation.before_training=false",
        "callbacks.validation.validation_num_inference_steps=1",
        "callbacks.validation.webhook_url=https://example.com/api/webhooks/1/SECRETTOKEN",
    )

    def run(*extra):
        return subprocess.run([*base, *extra], env=_env(), capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    record = tmp_path / "run" / "result.json"  # its overrides are redacted (test_secrets.py: the rest)
    assert "webhook_url=<redacted>" in record.read_text() and "SECRETTOKEN" not in record.read_text()
    changed = run("adapter.rank=8")
    assert changed.returncode == 2, changed.stdout[-2000:] + changed.stderr[-2000:]
    assert "Traceback" not in changed.stderr and "already finished" not in changed.stdout
    assert (
        changed.stderr.strip().splitlines()[-1].startswith("error: run dir ")
        and "adapter.rank (16 -> 8)" in changed.stderr
    )
    longer = run("trainer.max_steps=3")
    assert longer.returncode == 0 and "(step 2)" in longer.stdout, longer.stderr[-2000:]
