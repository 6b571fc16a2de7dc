"""LyCORIS LoKr (targets, factors, files diffusers/ComfyUI/LyCORIS read), continuing from a file
(``init_lora``), and LoftQ initialisation."""

import pytest
import torch
from lycoris.functional import factorization
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux_lightning import FluxLoRAModule
from flux_lightning.adapters.lokr import lokr_network, to_diffusers_state_dict
from flux_lightning.model.components import load_transformer

from ..support.helpers import fit, lokr, lora, predict, timesteps_for, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(cfg, adapter):
    m = FluxLoRAModule(cfg, adapter, timesteps_for(cfg))
    m.configure_model()
    return m


def test_quickstart_lokr_preset_wraps_attention_and_feed_forward_with_their_factors(cache_root):
    module = _module(tiny_cfg(cache_root, "krea"), lokr(factor=16, ff_factor=8, full_matrix=True))
    t = module.transformer
    wrapped = {lk.lora_name: lk for lk in lokr_network(t).loras}
    linears = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear) and (".attn." in n or ".ff" in n)}
    assert {n.replace(".", "_") for n in linears} == {k.removeprefix("lycoris_") for k in wrapped}
    for name, lk in wrapped.items():
        out_dim, in_dim = lk.shape
        factor = 8 if "_ff_" in name or "_ff_context_" in name else 16
        (a, b), (c, d) = factorization(out_dim, factor), factorization(in_dim, factor)
        assert tuple(lk.lokr_w1.shape) == (a, c) and tuple(lk.lokr_w2.shape) == (b, d), name
    assert all(".lokr_" in n for n, p in module.named_parameters() if p.requires_grad)
    assert set(module.state_dict()) == {n for n, p in module.named_parameters() if p.requires_grad}


def test_lokr_file_is_the_lycoris_layout_comfyui_reads(cache_root, tmp_path):
    module = fit(tiny_cfg(cache_root, "krea", gradient_checkpointing=False), lokr(), steps=2)
    path = module.export_adapter(tmp_path)
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    modules = {n for n, _ in module.transformer.named_modules()}
    assert meta["flux_lightning.adapter"] == "lokr" and meta["lycoris_algo"] == "lokr"
    for key in keys:  # ComfyUI maps "lycoris_<diffusers module path, dots as underscores>"
        stem, suffix = key.split(".", 1)
        assert stem.startswith("lycoris_") and suffix in ("lokr_w1", "lokr_w2", "alpha"), key
        assert any(stem == "lycoris_" + m.replace(".", "_") for m in modules), key


def test_lokr_with_one_factor_loads_in_diffusers_peft(cache_root):
    module = fit(
        tiny_cfg(cache_root, "krea", gradient_checkpointing=False),
        lokr(factor=4, ff_factor=None, full_matrix=False, rank=2),
        steps=3,
    )
    state = to_diffusers_state_dict(module.transformer)
    assert any(k.endswith(".lokr_w2_a") for k in state), "expected a low-rank W2 with full_matrix=false"
    fresh = load_transformer(module.model_cfg)
    fresh.load_lora_adapter(state, prefix="transformer", adapter_name="lokr")
    outside = FluxLoRAModule(module.model_cfg, lokr(), timesteps_for(module.model_cfg))
    outside.transformer = fresh
    torch.testing.assert_close(predict(outside), predict(module), atol=1e-5, rtol=1e-5)


# -- init_lora --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_file(cache_root, tmp_path_factory):
    module = fit(tiny_cfg(cache_root, "krea", gradient_checkpointing=False), lora(rank=4, alpha=8.0), steps=3)
    return module.export_adapter(tmp_path_factory.mktemp("init"), dtype=torch.float32), module


def test_init_lora_continues_from_the_file(cache_root, lora_file):
    path, trained = lora_file
    cont = _module(tiny_cfg(cache_root, "krea"), lora(rank=4, alpha=8.0, init_lora=str(path)))
    torch.testing.assert_close(predict(cont), predict(trained), atol=1e-6, rtol=1e-6)
    # another alpha: B is rescaled so the starting update is the file's
    rescaled = _module(tiny_cfg(cache_root, "krea"), lora(rank=4, alpha=2.0, init_lora=str(path)))
    torch.testing.assert_close(predict(rescaled), predict(trained), atol=1e-5, rtol=1e-5)


def test_init_lora_without_metadata_reads_kohya_style_alphas(cache_root, lora_file, tmp_path):
    path, trained = lora_file
    state = load_file(path)
    bare = tmp_path / "bare.safetensors"
    save_file(state, bare)  # no metadata at all: alpha unknown -> taken as the config's
    cont = _module(tiny_cfg(cache_root, "krea"), lora(rank=4, alpha=8.0, init_lora=str(bare)))
    torch.testing.assert_close(predict(cont), predict(trained), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(rank=8), "has rank 4 but adapter.rank=8"),
        (dict(target="mmdit"), "wraps other modules than adapter.target='mmdit'"),
    ],
)
def test_init_lora_mismatch_is_a_clear_error(cache_root, lora_file, change, message):
    path, _ = lora_file
    module = FluxLoRAModule(tiny_cfg(cache_root, "krea"), lora(**{"alpha": 8.0, "init_lora": str(path), **change}))
    with pytest.raises(ValueError, match=message):
        module.configure_model()


def test_init_lora_for_lokr(cache_root, tmp_path):
    cfg = tiny_cfg(cache_root, "krea", gradient_checkpointing=False)
    trained = fit(cfg, lokr(), steps=2)
    path = trained.export_adapter(tmp_path, dtype=torch.float32)
    cont = _module(cfg, lokr(init_lora=str(path)))
    torch.testing.assert_close(predict(cont), predict(trained), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="adapter.init_lora: .* does not match this LoKr"):
        _module(cfg, lokr(target="mmdit", init_lora=str(path)))


# -- LoftQ --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT's LoftQ runs its NF4 rounds on CUDA only")
def test_loftq_starts_from_the_quantization_residual(cache_root):
    cfg = tiny_cfg(cache_root, "krea")
    module = _module(cfg, lora(rank=4, init="loftq", target=["ff.net.0.proj"]))
    layer = module.transformer.transformer_blocks[0].ff.net[0].proj
    original = load_transformer(cfg).transformer_blocks[0].ff.net[0].proj.weight
    q = layer.base_layer.weight  # LoftQ replaced W by its NF4 approximation Q
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert not torch.equal(q, original)
    # Q + BA approximates W better than Q alone
    assert (q + delta - original).norm() < (q - original).norm()
