"""The flow-matching math equals diffusers' own Flux helpers and the formulas in docs/architecture.md."""

import math

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from flux_lightning.training import flow
from flux_lightning.training.flow import TimestepConfig


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (1, 16, 6, 10), (3, 4, 2, 4)])
def test_pack_matches_diffusers_and_unpack_inverts(shape):
    x = torch.randn(shape)
    b, c, h, w = shape
    ours = flow.pack_latents(x)
    theirs = FluxPipeline._pack_latents(x, b, c, h, w)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # diffusers' unpack takes pixel sides (latent * vae_scale_factor 8)
    torch.testing.assert_close(
        flow.unpack_latents(ours, h, w), FluxPipeline._unpack_latents(theirs, h * 8, w * 8, 8), atol=1e-6, rtol=0
    )
    assert torch.equal(flow.unpack_latents(ours, h, w), x)


def test_pack_rejects_odd_latents():
    with pytest.raises(ValueError, match="even"):
        flow.pack_latents(torch.zeros(1, 16, 5, 4))


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10), (128, 96)])
def test_image_ids_match_diffusers(h, w):
    theirs = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    torch.testing.assert_close(flow.image_ids(h, w), theirs, atol=1e-6, rtol=0)


def test_text_ids_are_zeros():
    assert torch.equal(flow.text_ids(7), torch.zeros(7, 3))


@pytest.mark.parametrize("seq", [256, 1024, 4096, 64, 9000])
def test_auto_shift_matches_calculate_shift(seq):
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert flow.auto_shift(seq) == pytest.approx(math.exp(mu), abs=1e-6)


def test_static_shift_matches_flow_match_scheduler():
    """The scheduler's static shift is the same map: s*t / (1 + (s-1)*t)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = torch.linspace(1.0, 1 / 1000, 1000)
    torch.testing.assert_close(flow.shift_sigmas(unshifted, 3.0), sched.sigmas, atol=1e-6, rtol=0)


def test_sigmoid_sampling_statistics():
    g = torch.Generator().manual_seed(0)
    s = flow.sample_sigmas(20000, TimestepConfig(), seq_len=1024, generator=g)
    assert ((s > 0) & (s < 1)).all()
    assert s.median().item() == pytest.approx(0.5, abs=0.02)
    wide = flow.sample_sigmas(20000, TimestepConfig(sigmoid_scale=3.0), seq_len=1024, generator=g)
    assert wide.std() > s.std()


def test_shifts_move_mass_toward_noise_and_are_deterministic():
    base = flow.sample_sigmas(5000, TimestepConfig(), seq_len=4096, generator=torch.Generator().manual_seed(1))
    static = flow.sample_sigmas(
        5000, TimestepConfig(flow_schedule_shift=3.0), seq_len=4096, generator=torch.Generator().manual_seed(1)
    )
    auto = flow.sample_sigmas(
        5000, TimestepConfig(flow_schedule_auto_shift=True), seq_len=4096, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(static, flow.shift_sigmas(base, 3.0))
    torch.testing.assert_close(auto, flow.shift_sigmas(base, math.exp(1.15)))
    assert static.mean() > base.mean()


def test_schnell_fast_schedule_draws_only_its_values():
    s = flow.sample_sigmas(4000, TimestepConfig(weighting="schnell_fast"), seq_len=4096)
    values, counts = s.unique(return_counts=True)
    assert set(values.tolist()) == {0.25, 0.5, 0.75, 1.0}
    assert counts[-1] / counts.sum() == pytest.approx(0.7, abs=0.03)


def test_noisy_input_target_and_loss():
    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sig = torch.tensor([0.0, 1.0])
    xt = flow.noisy_latents(x0, noise, sig)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    mid = flow.noisy_latents(x0, noise, torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(mid, 0.75 * x0 + 0.25 * noise)
    assert torch.equal(flow.flow_target(x0, noise), noise - x0)
    pred = torch.zeros_like(x0)
    per_sample = flow.flow_loss(pred, torch.ones_like(x0))
    assert per_sample.shape == (2,) and torch.allclose(per_sample, torch.ones(2))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    torch.testing.assert_close(flow.flow_loss(pred, torch.ones_like(x0), mask), torch.full((2,), 0.5))


def test_loss_is_fp32_for_bf16_inputs():
    pred = torch.randn(2, 16, 4, 4).bfloat16()
    assert flow.flow_loss(pred, torch.zeros_like(pred)).dtype == torch.float32


def test_joint_attention_mask_equals_diffusers_text_then_image_mask():
    from diffusers import ChromaPipeline  # diffusers' masked-T5 Flux-family pipeline builds the same mask

    text = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    theirs = ChromaPipeline._prepare_attention_mask(None, 2, 6, torch.float32, text.bool())
    ours = flow.joint_attention_mask(text, image_tokens=6, batch_size=2)
    assert ours.dtype == torch.bool and torch.equal(ours, theirs)
    # one prompt's mask (validation) serves every sample of the batch
    for one in (text[1], text[1:]):
        assert torch.equal(flow.joint_attention_mask(one, 6, 2), theirs[1].expand(2, -1))
