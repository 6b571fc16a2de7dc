"""`compile: true`: transformer blocks compiled in place, same results, clear fallback where unsupported."""

import logging

import pytest
import torch

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.adapters import add_lora
from flux_lightning.model.compilation import compile_blocks, compile_unsupported_reason, is_compiled
from flux_lightning.model.components import load_transformer
from flux_lightning.model.tread import TreadRoute, routed_forward
from flux_lightning.training.flow import image_ids, text_ids


def _transformer(cfg):
    t = load_transformer(cfg)
    torch.manual_seed(0)
    add_lora(t, AdapterConfig(rank=4, dropout=0.0, init="gaussian"))
    t.enable_gradient_checkpointing()
    return t.train()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.rand(2, generator=g),
        guidance=torch.ones(2),
        txt_ids=text_ids(8),
        img_ids=image_ids(8, 8),
    )


def test_blocks_compile_in_place_with_unchanged_names_and_results(tiny_model_cfg):
    t = _transformer(tiny_model_cfg)
    inputs = _inputs()
    route = [TreadRoute(0.5, 1, 2)]
    torch.manual_seed(1)
    expected = routed_forward(t, route, **inputs)
    expected.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in t.named_parameters() if p.grad is not None}
    t.zero_grad()
    keys = list(t.state_dict())

    # aot_eager traces forward and backward like inductor does, without minutes of C++ codegen
    assert compile_blocks(t, device_type="cpu", backend="aot_eager")
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    assert blocks and all(is_compiled(b) for b in blocks)
    assert list(t.state_dict()) == keys, "checkpoint and LoRA export names must not change"
    torch.manual_seed(1)
    out = routed_forward(t, route, **inputs)  # TREAD + gradient checkpointing + PEFT through compiled blocks
    out.square().mean().backward()
    torch.testing.assert_close(out, expected)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(t.named_parameters())[name].grad, grad)


def test_unsupported_platform_falls_back_with_a_message(tiny_model_cfg, monkeypatch, caplog):
    import flux_lightning.model.compilation as compilation

    t = _transformer(tiny_model_cfg)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="flux_lightning.model.compilation"):
        assert not compile_blocks(t, device_type="cpu")
    assert "compile: true is ignored, training runs eagerly" in caplog.text
    assert "needs a C++ compiler" in caplog.text
    assert not any(is_compiled(b) for b in t.transformer_blocks)


def test_an_nf4_base_is_not_compiled(tiny_model_cfg):
    t = _transformer(tiny_model_cfg)

    class Linear4bit(torch.nn.Linear):  # what bitsandbytes calls its NF4 layer
        pass

    t.transformer_blocks[0].attn.to_q.base_layer = Linear4bit(4, 4)
    assert "NF4" in compile_unsupported_reason(t, "cuda")


def test_module_compiles_when_asked(tiny_model_cfg, monkeypatch):
    import flux_lightning.model.compilation as compilation

    calls = []
    monkeypatch.setattr(compilation, "compile_blocks", lambda t, **kw: calls.append((t, kw)) or True)
    m = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=4), compile=True)
    m.configure_model()
    assert calls and calls[0][0] is m.transformer
    assert m.hparams["compile"] is True
    calls.clear()
    FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=4)).configure_model()
    assert not calls


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_reason_is_none_where_compile_works(tiny_model_cfg, device, monkeypatch):
    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr("flux_lightning.model.compilation.shutil.which", lambda name: f"/usr/bin/{name}")
    assert compile_unsupported_reason(_transformer(tiny_model_cfg), device) is None
