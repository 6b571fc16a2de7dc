"""Quantized bases: what is quantized, how small it gets, and that adapters on top train, checkpoint,
resume and export without any base tensor."""

from dataclasses import replace
from functools import partial

import lightning as L
import pytest
import torch
from optimum.quanto.nn import QLinear
from safetensors import safe_open

from flux_lightning import FluxLoRAModule
from flux_lightning.model.components import load_text_encoders, load_transformer, model_identity
from flux_lightning.model.quantization import KEEP_HIGH_PRECISION, QuantizationConfig, quantizable_linears, weight_bytes

from ..support.helpers import BatchDataset, fit, lokr, lora, needs_bnb, predict, timesteps_for, tiny_cfg, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _bf16(cache_root, precision):
    cfg = tiny_cfg(cache_root, "krea")
    return load_transformer(replace(cfg, quantization=QuantizationConfig(precision, base_model_default_dtype="bf16")))


@pytest.fixture(scope="module")
def bf16_bytes(cache_root):
    return weight_bytes(_bf16(cache_root, "none"))


@pytest.mark.parametrize(
    "precision,limit",
    [
        ("int8_quanto", 0.55),
        ("fp8_quanto", 0.55),
        ("int4_quanto", 0.35),
        ("int2_quanto", 0.25),
        pytest.param("nf4_bnb", 0.55, marks=needs_bnb),
    ],
)
def test_quantized_weight_bytes_shrink(cache_root, bf16_bytes, precision, limit):
    ratio = weight_bytes(_bf16(cache_root, precision)) / bf16_bytes
    assert ratio <= limit, f"{precision}: {ratio:.3f} of bf16 weight bytes"


def test_norms_embedders_and_final_layers_stay_high_precision(cache_root):
    t = _bf16(cache_root, "int8_quanto")
    modules = dict(t.named_modules())
    for name in KEEP_HIGH_PRECISION:
        assert type(modules[name]) is torch.nn.Linear and modules[name].weight.dtype == torch.bfloat16, name
    quantized = {n for n, m in modules.items() if isinstance(m, QLinear)}
    assert quantized == set(quantizable_linears(t)) and "transformer_blocks.0.attn.to_q" in quantized
    norms = [
        m for m in modules.values() if "Norm" in type(m).__name__ and hasattr(m, "weight") and m.weight is not None
    ]
    assert norms and all(type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.bfloat16 for m in norms)


@pytest.mark.parametrize("adapter", [lora, lokr])
def test_adapter_checkpoints_do_not_grow_with_quantization(cache_root, tmp_path, adapter):
    sizes, keys = {}, {}
    for precision in ("none", "int8_quanto", "int4_quanto"):
        module = fit(tiny_cfg(cache_root, "krea", precision, gradient_checkpointing=False), adapter(), steps=1)
        module.trainer.save_checkpoint(tmp_path / f"{precision}.ckpt")
        sizes[precision] = (tmp_path / f"{precision}.ckpt").stat().st_size
        state = module.state_dict()
        keys[precision] = {k: tuple(v.shape) for k, v in state.items()}
        assert all(p.requires_grad for n, p in module.named_parameters() if n in state)
    assert keys["none"] == keys["int8_quanto"] == keys["int4_quanto"]
    assert max(sizes.values()) <= sizes["none"] * 1.02, sizes


def test_resume_on_a_quantized_base_restores_adapter_and_optimizer(cache_root, tmp_path):
    cfg = tiny_cfg(cache_root, "krea", "int8_quanto", gradient_checkpointing=False)
    first = fit(cfg, lora(), steps=2)
    first.trainer.save_checkpoint(tmp_path / "step2.ckpt")
    saved = {k: v.clone() for k, v in first.state_dict().items()}

    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["steps"] = [int(s["step"]) for s in trainer.optimizers[0].state_dict()["state"].values()]

    second = FluxLoRAModule(cfg, lora(), timesteps_for(cfg), optimizer=partial(torch.optim.AdamW, lr=1e-2))
    t = trainer(3, callbacks=[Capture()])
    t.fit(second, torch.utils.data.DataLoader(BatchDataset(), batch_size=2), ckpt_path=tmp_path / "step2.ckpt")
    assert t.global_step == 3
    assert seen["state"].keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(seen["state"][k], saved[k])
    assert seen["steps"] and set(seen["steps"]) == {2}
    assert any(not torch.equal(second.state_dict()[k], saved[k]) for k in saved), "no step after resume"


@needs_bnb
def test_lora_on_nf4_bitsandbytes_trains_and_exports(cache_root, tmp_path):
    import bitsandbytes as bnb

    module = fit(tiny_cfg(cache_root, "krea", "nf4_bnb", gradient_checkpointing=False), lora(), steps=2)
    base = module.transformer.transformer_blocks[0].attn.to_q.base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    path = module.export_adapter(tmp_path)
    with safe_open(path, "pt") as f:
        assert all(".lora_" in k for k in f.keys()) and f.metadata()["flux_lightning.model.quantization"] == "nf4_bnb"
    assert torch.isfinite(predict(module)).all()


def test_quantize_via_accelerator_without_a_gpu_quantizes_on_the_cpu(cache_root):
    t = load_transformer(
        replace(tiny_cfg(cache_root, "krea"), quantization=QuantizationConfig("int8_quanto", "accelerator"))
    )
    assert isinstance(t.transformer_blocks[0].attn.to_q, QLinear) and t.x_embedder.weight.device.type == "cpu"


def test_text_encoder_precision_quantizes_encoders_and_changes_the_cache_key(cache_root):
    cfg = tiny_cfg(cache_root, "krea")
    quantized = replace(cfg, quantization=QuantizationConfig(text_encoder_precision="int8_quanto"))
    parts = load_text_encoders(quantized)
    assert any(isinstance(m, QLinear) for m in parts["text_encoder_2"].modules())
    assert model_identity(quantized, "text") != model_identity(cfg, "text")
    assert model_identity(quantized, "vae") == model_identity(cfg, "vae")


def test_principal_inits_are_refused_on_a_quantized_base(cache_root):
    module = FluxLoRAModule(tiny_cfg(cache_root, "krea", "int8_quanto"), lora(init="loftq"))
    with pytest.raises(ValueError, match="adapter.init=loftq rewrites the base weights"):
        module.configure_model()
