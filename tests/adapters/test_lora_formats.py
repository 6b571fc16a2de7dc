"""diffusers, ComfyUI and kohya files of one LoRA (alpha != rank) load to the same model in diffusers'
own loader and in ComfyUI's (emulated in tests/support/comfy_loader.py)."""

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from flux_lightning import AdapterConfig
from flux_lightning.adapters import ADAPTER_FILENAME
from flux_lightning.adapters.lora_formats import convert, kohya_name

from ..conftest import fit_tiny
from ..support.comfy_loader import comfyui_apply, effective_weights
from .test_adapters import _predict

# every double-block module kohya fuses or renames, plus single-block linear2 and modulation.
# (diffusers' kohya reader hard-codes FLUX.1's 3072/12288 widths when splitting single-block
# linear1, so the tiny model's linear1 is checked by the math test below instead.)
TARGETS = [
    f"transformer_blocks.{i}.{m}"
    for i in (0, 1)
    for m in (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.2",
    )
] + ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]


@pytest.fixture(scope="module")
def trained(tiny_model_cfg, cache_root):
    module, _ = fit_tiny(
        tiny_model_cfg,
        cache_root,
        steps=5,
        lr=2e-2,
        adapter=AdapterConfig(rank=4, alpha=8.0, dropout=0.0, target=TARGETS),
    )
    return module


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_each_format_loads_in_diffusers_and_reproduces_the_model(trained, tiny_folder, tmp_path, fmt):
    trained.export_adapter(tmp_path, dtype=torch.float32, lora_format=fmt)
    keys = list(safe_open(tmp_path / ADAPTER_FILENAME, "pt").keys())
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in keys)
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    else:
        assert all(k.startswith("transformer.") for k in keys)
        assert any(k.endswith(".alpha") for k in keys) == (fmt == "comfyui")
    pipe = FluxPipeline.from_pretrained(tiny_folder)
    base = _predict(pipe.transformer)
    pipe.load_lora_weights(tmp_path)
    ours = _predict(trained.transformer)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(_predict(pipe.transformer), ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_comfyui_loader_applies_each_format_at_the_trained_strength(trained, tmp_path, fmt):
    """ComfyUI reads tensors only (alpha from ``.alpha`` tensors, else scale 1): every format must
    still give W + (alpha / r) B A, here with alpha = 2 r."""
    path = trained.export_adapter(tmp_path, dtype=torch.float32, lora_format=fmt)
    patched, not_loaded = comfyui_apply(load_file(path), trained.transformer)
    assert not not_loaded, f"ComfyUI would not load {sorted(not_loaded)[:3]}"
    expected = effective_weights(trained.transformer)
    assert patched.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(patched[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_alpha_keeps_its_effect_without_metadata(trained, tiny_folder, tmp_path):
    """A loader that ignores file metadata applies every format at the trained strength."""
    for fmt in ("diffusers", "comfyui", "kohya"):
        trained.export_adapter(tmp_path / fmt, dtype=torch.float32, lora_format=fmt)
        state = load_file(tmp_path / fmt / ADAPTER_FILENAME)  # tensors only, metadata dropped
        pipe = FluxPipeline.from_pretrained(tiny_folder)
        pipe.load_lora_weights(state)
        torch.testing.assert_close(_predict(pipe.transformer), _predict(trained.transformer), atol=1e-5, rtol=1e-4)


def test_kohya_fusion_is_the_same_update_including_single_block_linear1():
    g = torch.Generator().manual_seed(0)
    r, d_in, inner, mlp = 2, 6, 8, 12
    state = {}
    for m, out in [("attn.to_q", inner), ("attn.to_k", inner), ("attn.to_v", inner)]:
        state[f"single_transformer_blocks.3.{m}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
        state[f"single_transformer_blocks.3.{m}.lora_B.weight"] = torch.randn(out, r, generator=g)
    widths = {f"single_transformer_blocks.3.{m}": inner for m in ("attn.to_q", "attn.to_k", "attn.to_v")}
    widths["single_transformer_blocks.3.proj_mlp"] = mlp
    out = convert(state, "kohya", alpha=3.0, out_features=widths)
    down = out["lora_unet_single_blocks_3_linear1.lora_down.weight"]
    up = out["lora_unet_single_blocks_3_linear1.lora_up.weight"]
    alpha = out["lora_unet_single_blocks_3_linear1.alpha"].item()
    fused = alpha / down.shape[0] * up @ down
    expected = torch.cat(
        [
            3.0
            / r
            * state[f"single_transformer_blocks.3.{m}.lora_B.weight"]
            @ state[f"single_transformer_blocks.3.{m}.lora_A.weight"]
            for m in ("attn.to_q", "attn.to_k", "attn.to_v")
        ]
        + [torch.zeros(mlp, d_in)]
    )
    torch.testing.assert_close(fused, expected)
    assert up.shape == (3 * inner + mlp, 3 * r)


def test_unknown_module_or_format_is_refused():
    with pytest.raises(ValueError, match="no name for module 'x_embedder'"):
        kohya_name("x_embedder")
    with pytest.raises(ValueError, match="lora_format='a1111' is unknown"):
        convert({}, "a1111", alpha=1.0)
