"""The Hydra tree: every experiment composes and validates offline; bad settings are named."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from flux_lightning.config.validation import ConfigError, validate
from flux_lightning.run.train import _instantiate_all, config_dir

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))


def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", *overrides],
        )


def test_there_is_a_krea_experiment():
    assert "krea_lora" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_validates_and_instantiates_offline(tmp_path, name):
    cfg = _compose(tmp_path, f"+experiment={name}")
    run = validate(cfg, check_sources=False)
    assert run.model.flavour
    assert callable(instantiate(cfg.optimizer)) and callable(instantiate(cfg.lr_scheduler))
    assert _instantiate_all(cfg.callbacks) and _instantiate_all(cfg.logger)


def test_krea_experiment_is_the_quickstart_run(tmp_path):
    run = validate(_compose(tmp_path, "+experiment=krea_lora"), check_sources=False)
    assert run.model.flavour == "krea" and run.model.spec.source == "black-forest-labs/FLUX.1-Krea-dev"
    assert (run.adapter.rank, run.adapter.target, run.adapter.lora_alpha) == (16, "all", 16.0)
    assert run.model.dtype == "bf16" and run.model.gradient_checkpointing
    assert run.dataset.resolution == 1024


def test_default_config_is_the_tiny_demo(tmp_path):
    cfg = _compose(tmp_path)
    run = validate(cfg)  # tiny builds locally; the demo data needs no folder
    assert run.model.flavour == "tiny" and run.dataset.instance_data_dir is None
    assert cfg.trainer.max_steps <= 500


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.flavour=turbo", "model.flavour='turbo' is unknown"),
        ("adapter.target=everything", "adapter.target='everything' is not a preset"),
        ("dataset.resolution=70", "dataset.resolution=70 must be a positive multiple of 16"),
        ("adapter.init=magic", "adapter.init='magic' is unknown"),
        ("dataset.instance_data_dir=/no/such/folder", "folder '/no/such/folder' does not exist"),
    ],
)
def test_bad_settings_give_one_clear_error(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        validate(_compose(tmp_path, override))
    assert message in str(info.value)


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate(_compose(tmp_path, "model.flavour=turbo", "dataset.resolution=70", "adapter.rank=0"))
    text = str(info.value)
    assert "model.flavour" in text and "dataset.resolution" in text and "adapter.rank" in text


def test_unknown_flavour_group_is_rejected_by_hydra(tmp_path):
    with pytest.raises(ConfigCompositionException, match="turbo"):
        _compose(tmp_path, "model=turbo")


def test_misspelt_key_is_rejected_while_composing(tmp_path):
    """The schema is registered: Hydra itself names the key and the dataclass."""
    with pytest.raises(ConfigCompositionException, match="rnk"):
        _compose(tmp_path, "adapter.rnk=4")
