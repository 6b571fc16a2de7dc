"""DoRA (``adapter.use_dora=true``, PEFT's): trains its magnitudes, resumes exactly, and the exported file
loads in diffusers as DoRA with outputs identical to the trained module; the combinations it cannot
take are refused before anything loads."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.adapters import adapters_disabled
from flux_lightning.config.validation import ConfigError, validate
from flux_lightning.model.components import load_transformer
from flux_lightning.run.train import config_dir

from ..callbacks.test_ema import STEPS, Recorder, _run
from ..support.helpers import lora, predict, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

DORA = AdapterConfig(rank=4, alpha=8.0, dropout=0.1, use_dora=True)  # alpha/r = 2: folded into B exactly


@pytest.fixture(scope="module")
def dora_run(tiny_model_cfg, cache_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora")
    recorder = Recorder()
    module = _run(tiny_model_cfg, cache_root, out, [recorder], adapter=DORA)
    return out, module, recorder


def test_dora_trains_its_magnitudes_and_resumes_exactly(dora_run, tiny_model_cfg, cache_root, tmp_path):
    out, module, recorder = dora_run
    magnitudes = [k for k in recorder.after[STEPS] if "lora_magnitude_vector" in k]
    assert magnitudes and all(k in module.state_dict() for k in magnitudes)  # in every checkpoint
    assert any(not torch.equal(recorder.after[1][k], recorder.after[STEPS][k]) for k in magnitudes)
    resumed = _run(tiny_model_cfg, cache_root, tmp_path, [], ckpt_path=out / "ckpt" / "s3.ckpt", adapter=DORA)
    final = recorder.after[STEPS]
    assert resumed.state_dict().keys() == final.keys()
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in final.items())


def test_the_exported_dora_loads_in_diffusers_with_identical_outputs(dora_run, tiny_model_cfg, tmp_path):
    _, module, _ = dora_run
    path = module.export_adapter(tmp_path, dtype=torch.float32)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    fresh = load_transformer(tiny_model_cfg)
    fresh.load_lora_adapter(str(path), prefix="transformer", adapter_name="loaded")
    assert fresh.peft_config["loaded"].use_dora
    outside = FluxLoRAModule(tiny_model_cfg, DORA)
    outside.transformer = fresh
    assert torch.equal(predict(outside), predict(module))


def test_dora_on_a_quantized_base_starts_as_the_base(cache_root):
    """PEFT's DoRA dequantizes quanto weights for its norms: at init (B = 0) the model is the base."""
    module = FluxLoRAModule(tiny_cfg(cache_root, quantization="int8_quanto"), lora(use_dora=True))
    module.configure_model()
    with adapters_disabled(module.transformer):
        base = predict(module)
    assert torch.equal(predict(module), base)


def _validate(tmp_path, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/c", *overrides])
    return validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["callbacks.adapter_export.lora_format=comfyui"], "callbacks.adapter_export.lora_format=comfyui"),
        (["callbacks.adapter_export.lora_format=kohya"], "callbacks.adapter_export.lora_format=kohya"),
        (["adapter=lokr"], "adapter.type=lokr"),
        (["adapter.init=gaussian"], "adapter.init=gaussian"),
    ],
)
def test_combinations_dora_cannot_take_are_refused_naming_both_fields(tmp_path, overrides, named):
    with pytest.raises(ConfigError) as err:
        _validate(tmp_path, "adapter.use_dora=true", *overrides)
    lines = [line for line in str(err.value).splitlines() if "adapter.use_dora" in line]
    assert lines and any(named in line for line in lines), str(err.value)


def test_the_library_export_refuses_dora_in_a_format_that_cannot_carry_it(dora_run, tmp_path):
    _, module, _ = dora_run
    with pytest.raises(ValueError, match="adapter.use_dora"):
        module.export_adapter(tmp_path, lora_format="comfyui")
    assert not any(tmp_path.iterdir())
    assert replace(DORA, use_dora=False).problems() == []
