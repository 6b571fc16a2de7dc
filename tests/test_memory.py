"""Memory features that run on a CPU: group offload mechanics (CPU to CPU, spilled to disk), VAE
tiling, the attention backend switch. (The CUDA-only paths are validated in test_config_combinations.)"""

from dataclasses import replace

import pytest
import torch

from flux_lightning.components import attention_backend_problem, load_transformer, load_vae, model_identity, set_attention_backend
from flux_lightning.memory import apply_group_offload

from .helpers import tiny_cfg


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False,
    )


@torch.no_grad()
def test_group_offload_to_disk_keeps_the_outputs(cache_root, tmp_path):
    cfg = tiny_cfg(cache_root, "krea", enable_group_offload=True, group_offload_to_disk_path=str(tmp_path / "spill"),
                   group_offload_use_stream=True)  # streams need CUDA: quietly off here
    t = load_transformer(cfg)
    before = t(**_inputs())[0]
    apply_group_offload(t, cfg, torch.device("cpu"))
    assert list((tmp_path / "spill").glob("*.safetensors")), "nothing was spilled to disk"
    torch.testing.assert_close(t(**_inputs())[0], before, atol=1e-6, rtol=1e-6)


def test_vae_tiling_is_applied_and_keys_the_latent_cache(cache_root):
    cfg = tiny_cfg(cache_root, "krea")
    tiled = replace(cfg, vae_enable_tiling=True)
    assert load_vae(tiled).use_tiling and not load_vae(cfg).use_tiling
    assert model_identity(tiled, "vae") != model_identity(cfg, "vae")
    assert model_identity(tiled, "text") == model_identity(cfg, "text")


@torch.no_grad()
def test_attention_backend_switch_reaches_the_processors(cache_root):
    t = load_transformer(tiny_cfg(cache_root, "krea"))
    sdpa = t(**_inputs())[0]
    set_attention_backend(t, "flex")  # PyTorch's flex attention runs (forward only) on a CPU
    assert str(t.transformer_blocks[0].attn.processor._attention_backend.value) == "flex"
    torch.testing.assert_close(t(**_inputs())[0], sdpa, atol=1e-5, rtol=1e-5)


def test_missing_attention_packages_give_an_install_hint():
    import importlib.util

    if importlib.util.find_spec("sageattention") is not None:
        pytest.skip("sageattention is installed here")
    message = attention_backend_problem("sageattention")
    assert "pip install sageattention" in message and "model.attention_backend=sdpa" in message
    with pytest.raises(RuntimeError, match="needs the sageattention package"):
        set_attention_backend(torch.nn.Module(), "sageattention")


def test_choosing_a_backend_does_not_leak_into_other_models(cache_root):
    first = load_transformer(tiny_cfg(cache_root, "krea"))
    set_attention_backend(first, "flex")
    second = load_transformer(tiny_cfg(cache_root, "krea"))  # sdpa: trains (flex has no CPU backward)
    out = second(**{**_inputs(), "hidden_states": _inputs()["hidden_states"].requires_grad_()})[0]
    out.sum().backward()
