"""One source of truth: every group option is merged into a registered dataclass schema, states only
what differs from it, and keeps its own values (the demo's values stay in the demo's config)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flux_lightning.config.schema import GROUP_SCHEMAS
from flux_lightning.config.validation import validate
from flux_lightning.model.quantization import QuantizationConfig
from flux_lightning.run.train import config_dir

from ..support.cli import flux_lightning

CONF = Path(config_dir())
REPO = Path(__file__).resolve().parents[2]
# group -> (schema, where its options land): quantization options are packaged at model.quantization
SCHEMAS = {**{g: (s, g) for g, s in GROUP_SCHEMAS.items()}, "quantization": (QuantizationConfig, "model.quantization")}


def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", *overrides]
        )


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _defaults(schema) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _repeated_defaults(values: dict, schema, prefix: str) -> list[str]:
    """Keys of ``values`` whose value equals ``schema``'s default (recursing into dataclass fields)."""
    out, defaults = [], _defaults(schema)
    for key, value in values.items():
        if key not in defaults:
            continue  # unknown keys are caught by composing
        default = defaults[key]
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            out += _repeated_defaults(value, type(default), f"{prefix}{key}.")
        elif value == default or (isinstance(default, tuple) and value == list(default)):
            out.append(f"{prefix}{key}={value!r}")
    return out


OPTIONS = [(g, o) for g in SCHEMAS for o in _options(g)]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_into_its_schema(tmp_path, group, option):
    schema, node = SCHEMAS[group]
    cfg = _compose(tmp_path, f"{group}={option}")
    assert OmegaConf.get_type(OmegaConf.select(cfg, node)) is schema


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_no_option_restates_a_schema_default(group, option):
    schema, _ = SCHEMAS[group]
    values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}
    assert not _repeated_defaults(values, schema, f"{group}."), "state only what differs from the dataclass"


def test_shared_copies_of_defaults_are_gone():
    assert not (CONF / "_shared").exists()
    for path in CONF.rglob("*.yaml"):
        assert "_shared" not in path.read_text(), path


def test_primary_config_sets_no_group_values():
    """The demo's values must not sit in the primary config, where they override every option."""
    primary = OmegaConf.load(CONF / "train.yaml")
    assert set(primary) == {"defaults"}


def test_an_optimizer_choice_keeps_its_own_learning_rate(tmp_path):
    assert _compose(tmp_path, "optimizer=prodigy").optimizer.lr == 1.0
    assert _compose(tmp_path, "+experiment=krea_lora", "optimizer=prodigy").optimizer.lr == 1.0


def test_demo_values_apply_to_the_demo_only(tmp_path):
    demo = _compose(tmp_path)
    assert (demo.optimizer.lr, demo.trainer.max_steps) == (1e-3, 300)
    real = _compose(tmp_path, "model=krea", "dataset=local")
    default_trainer = OmegaConf.load(CONF / "trainer" / "default.yaml")
    assert real.optimizer.lr == 1e-4 and real.trainer.max_steps == default_trainer.max_steps


def test_backend_file_is_a_command_line_field(tmp_path):
    cfg = _compose(tmp_path, "dataset.backend_file=examples/multibackend/multidatabackend.json")
    assert cfg.dataset.backend_file.endswith("multidatabackend.json")
    cfg = _compose(tmp_path, "dataset=multibackend", "dataset.backend_file=x.json")
    assert cfg.dataset.backend_file == "x.json"


def _cli(*args, cwd=REPO, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        flux_lightning(*args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_backend_file_on_the_cli_as_the_readme_writes_it():
    out = _cli("dataset.backend_file=examples/multibackend/multidatabackend.json", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "backend_file: examples/multibackend/multidatabackend.json" in out.stdout


def test_help_lists_groups_and_options():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for line in ("model: dev, fluxbooru, kontext, krea, libreflux, schnell, tiny", "optimizer: adamw", "experiment: "):
        assert line in out.stdout
    assert "krea_lora" in out.stdout


def test_schnell_picks_its_fast_schedule_by_itself(tmp_path):
    run = validate(_compose(tmp_path, "model=schnell", "dataset=local"), check_sources=False)
    assert run.timesteps.weighting == "schnell_fast"
    run = validate(
        _compose(tmp_path, "model=schnell", "dataset=local", "timesteps=auto_shift", "timesteps.force_schedule=true"),
        check_sources=False,
    )
    assert run.timesteps.weighting == "sigmoid" and run.timesteps.flow_schedule_auto_shift
    assert (
        validate(_compose(tmp_path, "model=krea", "dataset=local"), check_sources=False).timesteps.weighting
        == "sigmoid"
    )


def test_schnell_module_resolves_the_schedule_from_the_python_api_too():
    from flux_lightning import FluxLoRAModule, ModelConfig

    assert FluxLoRAModule(ModelConfig(flavour="schnell")).timesteps.weighting == "schnell_fast"
    assert FluxLoRAModule(ModelConfig(flavour="krea")).timesteps.weighting == "sigmoid"


def test_conf_readme_maps_every_group_folder_and_typed_node():
    """conf/README.md names every group folder and every typed node of ``TrainConfig`` with its dataclass."""
    import typing

    from flux_lightning.config.schema import TrainConfig

    text = (REPO / "conf" / "README.md").read_text()
    folders = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    missing = [f"{name}/" for name in folders if f"`{name}/`" not in text]
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(hints[f.name]) and (
            f"`{f.name}`" not in text or hints[f.name].__name__ not in text
        ):
            missing.append(f"{f.name} ({hints[f.name].__name__})")
    assert folders and not missing, f"conf/README.md does not map: {missing}"
