"""LoRA targets, adapter-only state, and the exported file loading back into diffusers unchanged."""

import json

import pytest
import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.adapters import (
    ADAPTER_FILENAME,
    TARGET_PRESETS,
    adapter_state_dict,
    add_adapter,
    add_lora,
    resolve_targets,
)
from flux_lightning.model.components import load_transformer
from flux_lightning.training.flow import image_ids, text_ids

from ..conftest import fit_tiny


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(2, 32, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.tensor([0.3, 0.8]),
        guidance=torch.tensor([1.0, 1.0]),
        img_ids=image_ids(8, 8),
        txt_ids=text_ids(32),
        return_dict=False,
    )


@torch.no_grad()
def _predict(transformer, seed=0):
    transformer.eval()
    return transformer(**_inputs(seed))[0]


def test_presets_match_design():
    assert TARGET_PRESETS["mmdit"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert set(TARGET_PRESETS["all"]) == {
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    }
    assert {"proj_mlp", "proj_out", "ff.net.2", "ff_context.net.0.proj"} <= set(TARGET_PRESETS["all+ffs"])
    assert TARGET_PRESETS["nano"] == ["single_transformer_blocks.7.proj_out"]
    assert resolve_targets(["to_q", "to_k"]) == ["to_q", "to_k"]
    with pytest.raises(ValueError, match="adapter.target='everything' is not a preset"):
        resolve_targets("everything")


def test_adapter_config_checks_its_own_fields_one_line_each(tmp_path):
    assert AdapterConfig().problems() == [] and AdapterConfig(type="lokr", target="attention+ff").problems() == []
    bad = AdapterConfig(
        type="lora", target="attention+ff", rank=0, dropout=1.0, init_lora=str(tmp_path / "x.safetensors")
    )
    problems = bad.problems()
    assert len(problems) == 4, problems
    assert problems[0].startswith("adapter.target='attention+ff' is a LyCORIS preset; use it with adapter=lokr")
    assert any(p.startswith("adapter.init_lora: file ") and "does not exist" in p for p in problems)
    lokr = AdapterConfig(type="lokr", target="everything", init="gaussian", factor=0).problems()
    assert len(lokr) == 3 and "(or a LyCORIS preset: attention+ff)" in lokr[0]


def test_adapter_state_dict_follows_the_adapter_type(tiny_model_cfg):
    for cfg, key in (
        (AdapterConfig(rank=2, target="mmdit"), ".lora_A.weight"),
        (AdapterConfig(type="lokr", target="mmdit", factor=4), ".lokr_w1"),
    ):
        t = load_transformer(tiny_model_cfg)
        add_adapter(t, cfg)
        state = adapter_state_dict(t, cfg)
        assert state and any(k.endswith(key) for k in state) and not any(k.startswith("transformer.") for k in state), (
            cfg.type
        )


@pytest.mark.parametrize(
    "target,expected",
    [
        ("mmdit", {"to_q", "to_k", "to_v", "to_out.0"}),
        ("context", {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}),
    ],
)
def test_lora_lands_on_the_preset_modules_only(tiny_model_cfg, target, expected):
    t = load_transformer(tiny_model_cfg)
    add_lora(t, AdapterConfig(rank=2, target=target))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in t.named_parameters() if ".lora_A." in n}
    assert wrapped and all(any(w.endswith("." + e) for e in expected) for w in wrapped)
    assert all(p.requires_grad == (".lora_" in n) for n, p in t.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in t.named_parameters() if ".lora_" in n)


def test_target_matching_nothing_is_an_error(tiny_model_cfg):
    t = load_transformer(tiny_model_cfg)
    with pytest.raises(ValueError, match="matches no module"):
        add_lora(t, AdapterConfig(target="nano"))  # the tiny model has 2 single blocks, not 8


def test_state_dict_and_checkpoint_hold_adapter_only(tiny_model_cfg):
    module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=2, target="mmdit"))
    module.configure_model()
    sd = module.state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(sd) == trainable and all(".lora_" in k for k in sd)
    adapter_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    base_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    assert adapter_bytes * 20 < base_bytes
    other = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=2, target="mmdit"))
    other.configure_model()
    other.load_state_dict(sd)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    wrong = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=2, target="all"))
    wrong.configure_model()
    with pytest.raises(RuntimeError, match="adapter state does not match"):
        wrong.load_state_dict(sd)


def _loaded_pipeline(tiny_folder, lora_dir):
    pipe = FluxPipeline.from_pretrained(tiny_folder)
    base = _predict(pipe.transformer)
    pipe.load_lora_weights(lora_dir)
    return pipe, base


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_exported_lora_loads_in_diffusers_with_every_key(tiny_folder, tiny_model_cfg, cache_root, tmp_path, alpha):
    module, _ = fit_tiny(
        tiny_model_cfg, cache_root, steps=6, lr=1e-2, adapter=AdapterConfig(rank=4, alpha=alpha, dropout=0.1)
    )
    path = module.export_adapter(tmp_path, dtype=torch.float32)
    assert path == tmp_path / ADAPTER_FILENAME
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    # alpha / r is folded into lora_B, so the file states alpha = r (ComfyUI ignores metadata)
    assert (
        meta["lora_rank"] == "4"
        and float(meta["lora_alpha"]) == 4
        and float(meta["lora_trained_alpha"]) == (alpha or 4)
    )
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 4

    pipe, base = _loaded_pipeline(tiny_folder, tmp_path)
    loaded = {
        f"transformer.{k.replace('.default_0', '')}"
        for k in get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")
    }
    assert loaded == keys, "keys dropped or added by diffusers' loader"
    ours = _predict(module.transformer)
    theirs = _predict(pipe.transformer)
    assert (theirs - base).abs().max() > 1e-3, "the LoRA has no effect"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_bf16_export_is_the_default_and_still_matches(tiny_folder, tiny_model_cfg, cache_root, tmp_path):
    module, _ = fit_tiny(tiny_model_cfg, cache_root, steps=4, lr=1e-2)
    module.export_adapter(tmp_path)
    with safe_open(tmp_path / ADAPTER_FILENAME, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    pipe, _ = _loaded_pipeline(tiny_folder, tmp_path)
    torch.testing.assert_close(_predict(pipe.transformer), _predict(module.transformer), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_export_a_lora_for_the_original_base(tiny_folder, tiny_model_cfg, cache_root, tmp_path, init):
    module, _ = fit_tiny(
        tiny_model_cfg, cache_root, steps=3, lr=1e-3, adapter=AdapterConfig(rank=2, alpha=4, init=init, dropout=0.0)
    )
    module.export_adapter(tmp_path, dtype=torch.float32)
    with safe_open(tmp_path / ADAPTER_FILENAME, "pt") as f:
        assert f.metadata()["lora_rank"] == "4"  # rank 2r after conversion
    pipe, _ = _loaded_pipeline(tiny_folder, tmp_path)
    torch.testing.assert_close(_predict(pipe.transformer), _predict(module.transformer), atol=1e-4, rtol=1e-4)


def test_gaussian_init_starts_as_identity(tiny_model_cfg):
    module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=2, init="gaussian"))
    module.configure_model()
    base = load_transformer(tiny_model_cfg)
    torch.testing.assert_close(_predict(module.transformer), _predict(base))
