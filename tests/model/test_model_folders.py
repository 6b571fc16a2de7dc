"""A local model folder is checked before any weights load: a component whose weight files are
missing (a partial download) and a VAE that does not downsample by 8 are one line each, naming them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from flux_lightning.config.schema import config_dir, register
from flux_lightning.config.validation import validate
from flux_lightning.errors import ConfigError
from flux_lightning.model.tiny import ensure_tiny_folder

register()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return ensure_tiny_folder(tmp_path_factory.mktemp("models"), guidance_embeds=True)


def _copy(tiny_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "flux"
    shutil.copytree(tiny_folder, folder)
    return folder


def _dev_config(tmp_path, folder: Path, *extra):
    """The `dev` flavour's composed config pointed at ``folder``."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp_path}/run",
                f"paths.cache_dir={tmp_path}/cache",
                "model=dev",
                f"model.pretrained_model_name_or_path={folder}",
                *extra,
            ],
        )


def _problems(tmp_path, folder: Path, *extra) -> str:
    cfg = _dev_config(tmp_path, folder, *extra)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return str(err.value)


def test_a_complete_folder_passes(tiny_folder, tmp_path):
    validate(_dev_config(tmp_path, tiny_folder))


def test_missing_transformer_weights_name_the_component(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    message = _problems(tmp_path, folder)
    assert f"transformer/diffusion_pytorch_model*.safetensors missing in {folder}" in message
    assert message.count("\n  - ") == 1


def test_a_missing_shard_of_a_sharded_text_encoder_is_named(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    enc = folder / "text_encoder_2"
    (enc / "model.safetensors").rename(enc / "model-00001-of-00002.safetensors")
    (enc / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    assert (
        "text_encoder_2/model-00002-of-00002.safetensors missing (named by model.safetensors.index.json)"
        in _problems(tmp_path, folder)
    )


@pytest.mark.parametrize("blocks", [3, 5])  # downsampling by 4, by 16
def test_a_vae_that_does_not_downsample_by_8_is_refused_naming_it(tiny_folder, tmp_path, blocks):
    folder = _copy(tiny_folder, tmp_path)
    config = folder / "vae" / "config.json"
    data = json.loads(config.read_text())
    data["block_out_channels"] = [16] * blocks
    config.write_text(json.dumps(data))
    message = _problems(tmp_path, folder)
    assert f"the VAE in {folder / 'vae'} downsamples by {2 ** (blocks - 1)}" in message
    assert "model.pretrained_vae_model_name_or_path" in message
    # a FLUX.1 VAE given separately is fine
    validate(_dev_config(tmp_path, folder, f"model.pretrained_vae_model_name_or_path={tiny_folder}"))
