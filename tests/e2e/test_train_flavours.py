"""End to end through Hydra and ``train()``: quantized bases with each adapter, flavour inputs from
the real data path (T5 masks from the text cache, kontext pairs), validation images, checkpoints
without base tensors, and resuming on a quantized base."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from flux_lightning.run.train import config_dir, train

from ..support.helpers import needs_bnb

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(run_dir, cache_root, *overrides):
    base = [
        f"paths.output_dir={run_dir}",
        f"paths.cache_dir={cache_root}",
        "adapter.rank=4",
        "logger=csv",
        "callbacks.validation.before_training=false",
        "callbacks.validation.every_n_steps=0",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


def _checkpoint_keys(path):
    return set(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])


def test_kontext_pairs_on_int8_with_lokr(tmp_path, cache_root):
    run = tmp_path / "kontext"
    cfg = _cfg(
        run,
        cache_root,
        "model.tiny_like=kontext",
        "dataset=kontext_pairs",
        "quantization=int8_quanto",
        "adapter=lokr",
        "adapter.factor=4",
        "optimizer=adamw",
        "optimizer.lr=1e-3",
        "trainer.max_steps=2",
    )
    assert math.isfinite(train(cfg))
    with safe_open(run / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        assert (
            f.metadata()["flux_lightning.adapter"] == "lokr"
            and f.metadata()["flux_lightning.model.quantization"] == "int8_quanto"
        )
        assert all(k.startswith("lycoris_") for k in f.keys())
    keys = _checkpoint_keys(run / "checkpoints" / "last.ckpt")
    assert keys and all(".lokr_" in k for k in keys)
    assert list((run / "validation" / "step_2").glob("*.png"))


@needs_bnb
def test_libreflux_on_nf4_with_paged_lion_validates_and_resumes(tmp_path, cache_root):
    run = tmp_path / "libre"
    common = ["model.tiny_like=libreflux", "quantization=nf4_bnb", "optimizer=lion8bit_paged", "optimizer.lr=1e-4"]
    assert math.isfinite(train(_cfg(run, cache_root, *common, "trainer.max_steps=2")))
    keys = _checkpoint_keys(run / "checkpoints" / "last.ckpt")
    assert keys and all(".lora_" in k and ".default." in k for k in keys)  # no NF4 base tensor
    assert list((run / "validation" / "step_2").glob("*.png"))  # true CFG with the T5 mask
    assert math.isfinite(train(_cfg(run, cache_root, *common, "trainer.max_steps=3")))  # resumes `latest`
    steps = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert steps == 3
