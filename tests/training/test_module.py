"""The training step computes exactly the flow-matching loss of docs/architecture.md, with diffusers' own packing."""

import pytest
import torch
from diffusers import FluxPipeline

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.training.flow import TimestepConfig


def _batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(b, 16, 8, 8, generator=g),
        "prompt_embeds": torch.randn(b, 32, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(b, 32, generator=g),
    }


def _module(cfg, **adapter):
    m = FluxLoRAModule(cfg, AdapterConfig(rank=4, dropout=0.0, init="gaussian", **adapter), TimestepConfig())
    m.configure_model()
    return m


def test_training_step_is_the_flow_matching_loss(tiny_model_cfg):
    m = _module(tiny_model_cfg)
    batch = _batch()
    loss = m.training_step(batch, 0)

    # the same step by hand, with diffusers' helpers and the formulas of docs/architecture.md
    x0 = batch["latents"]
    noise, sigma = m.noise_and_sigmas(x0, 0)
    xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    with torch.no_grad():
        pred = m.transformer(
            hidden_states=FluxPipeline._pack_latents(xt, 2, 16, 8, 8),
            timestep=sigma,
            guidance=torch.ones(2),
            pooled_projections=batch["pooled_prompt_embeds"],
            encoder_hidden_states=batch["prompt_embeds"],
            txt_ids=torch.zeros(32, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
            return_dict=False,
        )[0]
    pred = FluxPipeline._unpack_latents(pred, 64, 64, 8)
    expected = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_cfg):
    from dataclasses import replace

    grads = []
    for ckpt in (True, False):
        torch.manual_seed(7)  # same gaussian LoRA init
        m = _module(replace(tiny_model_cfg, gradient_checkpointing=ckpt))
        assert m.transformer.is_gradient_checkpointing == ckpt
        torch.manual_seed(0)
        m.training_step(_batch(), 0).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_only_adapter_parameters_reach_the_optimizer(tiny_model_cfg):
    m = _module(tiny_model_cfg)
    opt = m.optimizer_factory(m.trainable_parameters())
    params = [p for group in opt.param_groups for p in group["params"]]
    names = {id(p): n for n, p in m.named_parameters()}
    assert params and all(".lora_" in names[id(p)] for p in params)


def test_noise_is_per_sample_deterministic_and_sigmoid_distributed(tiny_model_cfg):
    m = FluxLoRAModule(tiny_model_cfg, seed=3)
    x0 = torch.zeros(64, 16, 4, 4)
    n1, s1 = m.noise_and_sigmas(x0, 5)
    n2, s2 = m.noise_and_sigmas(x0, 5)
    assert torch.equal(n1, n2) and torch.equal(s1, s2)
    n3, _ = m.noise_and_sigmas(x0, 6)
    assert not torch.equal(n1, n3)
    # a sample's noise does not depend on the rest of its batch
    n_small, s_small = m.noise_and_sigmas(x0[:2], 5)
    assert torch.equal(n_small, n1[:2]) and torch.equal(s_small, s1[:2])
    assert n1.std().item() == pytest.approx(1.0, abs=0.05)
    assert ((s1 > 0) & (s1 < 1)).all() and abs(s1.median().item() - 0.5) < 0.15
    assert not torch.equal(FluxLoRAModule(tiny_model_cfg, seed=4).noise_and_sigmas(x0, 5)[0], n1)
