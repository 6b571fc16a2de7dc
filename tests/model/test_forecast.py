"""The VRAM forecast's arithmetic: exact parameter and weight bytes, the adapter PEFT adds, the
activation terms, and where the forecast is shown (run start, wizard, web UI). Its check against
measured peaks at real width is benchmarks/memory_vs_reference.py (benchmarks/README.md)."""

import json

import pytest
import torch

from flux_lightning import AdapterConfig, ModelConfig
from flux_lightning.model.forecast import (
    FLUX1_TRANSFORMER,
    GIB,
    HEADROOM_BYTES,
    SAVED_BYTES_PER_TOKEN,
    WORKSPACE_BYTES_PER_TOKEN,
    activation_bytes,
    adapter_parameters,
    forecast,
    parameter_count,
    transformer_config,
    weight_bytes,
)
from flux_lightning.model.quantization import QuantizationConfig

from ..support.helpers import needs_bnb

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=2,
    joint_attention_dim=256,
    pooled_projection_dim=64,
)


def _meta_model(config):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**{**FLUX1_TRANSFORMER, **config})


@pytest.mark.parametrize("config", [{}, {"guidance_embeds": False}, SMALL])
def test_parameter_count_is_diffusers_own(config):
    expected = sum(p.numel() for p in _meta_model(config).parameters())
    assert parameter_count(config) == expected
    if not config:
        assert expected == 11_901_408_320  # FLUX.1-dev
        assert weight_bytes(config, 2) == 2 * expected


@pytest.mark.parametrize("precision", ["int8_quanto", "int4_quanto", pytest.param("nf4_bnb", marks=needs_bnb)])
def test_quantized_weight_bytes_match_a_quantized_model(precision):
    """Every tensor of the quantized model's state (data, scales, shifts, biases) against the forecast."""
    from diffusers import FluxTransformer2DModel

    from flux_lightning.model.quantization import quantize_transformer

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**FLUX1_TRANSFORMER, **SMALL}).to(torch.bfloat16).requires_grad_(False)
    quantize_transformer(model, QuantizationConfig(precision), compute_dtype=torch.bfloat16)
    real = 0
    for value in model.state_dict().values():
        parts = [value] if type(value) is torch.Tensor else [getattr(value, a) for a in value.__tensor_flatten__()[0]]
        real += sum(t.numel() * t.element_size() for t in parts)
    assert weight_bytes(SMALL, 2, precision) == pytest.approx(real, rel=0.02)


@pytest.mark.parametrize("target", ["all", "all+ffs", ["to_q", "proj_out"]])
def test_adapter_parameters_are_what_peft_adds(tiny_model_cfg, target):
    from flux_lightning.adapters import add_adapter
    from flux_lightning.model.components import load_transformer

    model = load_transformer(tiny_model_cfg)
    add_adapter(model, AdapterConfig(rank=4, target=target))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from flux_lightning.adapters.config import resolve_targets

    assert adapter_parameters(transformer_config(tiny_model_cfg), resolve_targets(target), 4) == trained


def test_activation_terms():
    """Per token per block, scaled by blocks, tokens, batch and dtype; checkpointing keeps a block's
    input (width values per token) plus one block recomputed; every n-th block with an interval."""
    tokens, d = 1536, 3072
    per = SAVED_BYTES_PER_TOKEN
    full = activation_bytes({}, tokens, 1, 2, checkpointing=False)
    assert full == int((per["outside"] + 19 * per["double"] + 38 * per["single"] + WORKSPACE_BYTES_PER_TOKEN) * tokens)
    ckpt = activation_bytes({}, tokens, 1, 2, checkpointing=True)
    assert ckpt == int((per["outside"] + 57 * d * 2 + per["double"] + WORKSPACE_BYTES_PER_TOKEN) * tokens)
    half = activation_bytes({}, tokens, 1, 2, checkpointing=True, interval=2)
    assert ckpt < half < full
    assert activation_bytes({}, tokens, 4, 2, checkpointing=True) == pytest.approx(4 * ckpt, abs=4)
    assert activation_bytes({}, tokens, 1, 4, checkpointing=True) == pytest.approx(2 * ckpt, abs=2)


def test_forecast_of_flux1_dev_at_512px_follows_the_quantization_ladder():
    """bf16 > int8 > int4 ~ NF4, the weights exact; tokens = (512/16)^2 image + 512 text."""
    out = {}
    for precision in ("none", "int8_quanto", "int4_quanto", "nf4_bnb"):
        model = ModelConfig(flavour="dev", dtype="bf16", quantization=QuantizationConfig(precision))
        out[precision] = forecast(model, AdapterConfig(rank=16), resolution=512)
    assert out["none"].tokens == 1024 + 512
    assert out["none"].weights == 2 * 11_901_408_320
    assert out["none"].total > out["int8_quanto"].total > out["int4_quanto"].total > out["nf4_bnb"].total
    assert out["int8_quanto"].weights / out["none"].weights == pytest.approx(0.5, abs=0.02)
    line = out["none"].line()
    assert line.startswith("VRAM forecast: ") and "GiB peak" in line and "\n" not in line
    offloaded = forecast(
        ModelConfig(flavour="dev", dtype="bf16", enable_group_offload=True), AdapterConfig(rank=16), resolution=512
    )
    assert offloaded.weights < out["none"].weights / 10


def test_warning_names_the_gpu_and_the_fixes():
    fc = forecast(ModelConfig(flavour="dev", dtype="bf16"), AdapterConfig(rank=16), resolution=512)
    assert fc.warning(80 * GIB) is None
    warning = fc.warning(int(fc.total + HEADROOM_BYTES - 1), "cuda:0 RTX")
    assert warning and "cuda:0 RTX" in warning and "quantization=" in warning and "\n" not in warning


def test_config_comes_from_the_local_folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({**FLUX1_TRANSFORMER, "num_layers": 1, "num_single_layers": 2})
    )
    cfg = ModelConfig(flavour="dev", pretrained_model_name_or_path=str(tmp_path))
    assert transformer_config(cfg)["num_single_layers"] == 2
    assert transformer_config(ModelConfig(flavour="schnell"))["guidance_embeds"] is False


def test_wizard_and_web_ui_show_the_forecast(tmp_path):
    from flux_lightning.ui.forms import compose_run

    good = compose_run({"model": "tiny"}, {}, workdir=tmp_path, check_sources=False)
    assert good["ok"], good["problems"]
    assert good["forecast"]["line"].startswith("VRAM forecast") and good["forecast"]["tokens"] > 0

    from flux_lightning.wizard.configure import _say_forecast
    from flux_lightning.wizard.plan import Plan

    said = []
    _say_forecast(
        Plan(flavour="krea", quantization="none", memory_gib=16.0, resolution=512, optimizer="adamw"), said.append
    )
    assert said[0].strip().startswith("VRAM forecast") and "exceeds 16 GiB" in said[1]
