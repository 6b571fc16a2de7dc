"""Scheduled sampling (rollout): off is the plain step, the Euler rollout is diffusers' Euler scheduler
stepping the same model, the multistep solvers follow a straight flow exactly, probability and ramp roll out the expected share, and a short run trains."""

from dataclasses import replace
from functools import partial

import lightning as L
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flux_lightning import FluxLoRAModule
from flux_lightning.training.flow import LossConfig, TimestepConfig, noisy_latents
from flux_lightning.training.rollout import (
    ScheduledSamplingConfig,
    euler_rollout,
    rollout,
    rollout_offsets,
    rollout_path,
    sigma_grid,
)

from ..support.helpers import BatchDataset, batch, lora, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(cfg, **kw):
    torch.manual_seed(7)  # the same gaussian LoRA init every time
    m = FluxLoRAModule(cfg, lora(init="gaussian"), TimestepConfig(), **kw)
    m.configure_model()
    return m


def _step(m, b):
    m.zero_grad()
    loss = m.training_step(b, 3)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def test_rollout_off_or_never_drawn_is_the_plain_step_bit_for_bit(tiny_model_cfg):
    b = {k: v for k, v in batch().items() if k != "reference_latents"}
    plain = _step(_module(tiny_model_cfg), b)
    for ss in (ScheduledSamplingConfig(), ScheduledSamplingConfig(max_step_offset=5, probability=1e-12)):
        loss, grads = _step(_module(tiny_model_cfg, scheduled_sampling=ss), b)
        assert torch.equal(loss, plain[0])
        assert all(torch.equal(grads[k], plain[1][k]) for k in plain[1])


def test_euler_rollout_is_diffusers_euler_scheduler_stepping_the_same_model(tiny_model_cfg):
    ss = ScheduledSamplingConfig(max_step_offset=4, probability=1.0, grid_steps=10, sampler="euler")
    m = _module(tiny_model_cfg, scheduled_sampling=ss)
    m.transformer.train()
    b = {k: v for k, v in batch(b=3).items() if k != "reference_latents"}
    x0 = b["latents"]
    noise, sigmas = m.noise_and_sigmas(x0, 0)
    text = (b["prompt_embeds"], b["pooled_prompt_embeds"])
    extra = dict(guidance=None, **m.conditioning(b))
    rolled = m.rolled_out(noisy_latents(x0, noise, sigmas), x0, noise, sigmas, 0, text, extra)
    assert m.transformer.training  # put back in train mode

    offsets = rollout_offsets(ss, 0, m.rollout_generators(3, 0))
    grid = sigma_grid(ss, m.timesteps, 16)
    m.transformer.eval()
    for i, (sigma, k) in enumerate(zip(sigmas.tolist(), offsets)):
        path = rollout_path(grid, sigma, k)
        assert path[-1] == sigma and len(path) - 1 <= k and all(a > c for a, c in zip(path, path[1:]))
        assert len(path) > 1  # every sample rolled out (probability 1, no sigma at the top of the grid)
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.sigmas = torch.tensor(path)  # the partial trajectory, set explicitly
        scheduler.timesteps = torch.tensor(path[:-1]) * scheduler.config.num_train_timesteps
        x = noisy_latents(x0[i : i + 1], noise[i : i + 1], torch.tensor([path[0]]))
        row = {key: v[i : i + 1] for key, v in extra.items() if v is not None}  # the flavour's conditioning
        for t in scheduler.timesteps:
            with torch.no_grad():
                v = m(x, (t / 1000).reshape(1), text[0][i : i + 1], text[1][i : i + 1], **row)
            x = scheduler.step(v, t, x).prev_sample
        torch.testing.assert_close(rolled[i : i + 1], x, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(rolled[i : i + 1], noisy_latents(x0, noise, sigmas)[i : i + 1])


@pytest.mark.parametrize("sampler", ["unipc", "dpm"])
def test_multistep_solvers_follow_a_straight_flow_exactly_and_start_with_an_euler_step(sampler):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    paths = [[0.9, 0.8, 0.65, 0.5, 0.42], [0.7, 0.3], [0.5]]  # 4 steps, 1 step, none

    def straight(x, sigma, rows):  # the exact velocity of x_s = (1 - s) x0 + s noise
        return noise[rows] - x0[rows]

    start = noisy_latents(x0, noise, torch.tensor([p[0] for p in paths]))
    out = rollout(straight, start, paths, sampler)
    end = noisy_latents(x0, noise, torch.tensor([p[-1] for p in paths]))
    torch.testing.assert_close(out, end, rtol=0, atol=2e-6)  # every sample lands on its training sigma

    def curved(x, sigma, rows):
        return torch.sin(3 * x) * sigma.view(-1, 1, 1, 1) + noise[rows]

    multi, euler = rollout(curved, start, paths, sampler), euler_rollout(curved, start, paths)
    torch.testing.assert_close(multi[1:], euler[1:], rtol=0, atol=1e-6)  # one step: the Euler step
    assert (multi[0] - euler[0]).abs().max() > 1e-3  # several steps: a higher-order solver, not Euler


def test_rollout_path_lies_on_the_grid_up_to_the_offset():
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert rollout_path(grid, 0.4, 2) == [0.75, 0.5, 0.4]
    assert rollout_path(grid, 0.4, 9) == [1.0, 0.75, 0.5, 0.4]  # the grid ends at 1
    assert rollout_path(grid, 0.4, 0) == [0.4] and rollout_path(grid, 1.0, 3) == [1.0]  # nothing noisier
    shifted = sigma_grid(ScheduledSamplingConfig(grid_steps=4), TimestepConfig(flow_schedule_shift=3.0), 16)
    plain = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(shifted, torch.cat([3 * plain / (1 + 2 * plain), torch.zeros(1)]).double())


def test_probability_and_ramp_roll_out_the_expected_share():
    gens = lambda n, s: [torch.Generator().manual_seed(s * 100003 + i) for i in range(n)]  # noqa: E731
    n = 4000
    flat = rollout_offsets(ScheduledSamplingConfig(max_step_offset=5, probability=0.3), 0, gens(n, 1))
    share = sum(k > 0 for k in flat) / n
    assert share == pytest.approx(0.3, abs=0.03)
    lengths = torch.bincount(torch.tensor([k for k in flat if k]), minlength=6)[1:] / sum(k > 0 for k in flat)
    assert torch.allclose(lengths, torch.full((5,), 0.2), atol=0.04)  # uniform over 1..5
    ramp = ScheduledSamplingConfig(max_step_offset=3, ramp_steps=100, prob_start=0.1, prob_end=0.7)
    for step, p in ((0, 0.1), (50, 0.4), (100, 0.7), (1000, 0.7)):
        assert ramp.probability_at(step) == pytest.approx(p)
        got = sum(k > 0 for k in rollout_offsets(ramp, step, gens(n, step + 2))) / n
        assert got == pytest.approx(p, abs=0.03), step


def test_rollout_draws_are_keyed_like_the_noise(tiny_model_cfg):
    m = FluxLoRAModule(tiny_model_cfg, seed=3)
    ss = ScheduledSamplingConfig(max_step_offset=5, probability=0.5)
    first = rollout_offsets(ss, 0, m.rollout_generators(64, 5))
    assert first == rollout_offsets(ss, 0, m.rollout_generators(64, 5))  # a resume draws the same
    assert first[:2] == rollout_offsets(ss, 0, m.rollout_generators(2, 5))  # per sample, not per batch
    assert first != rollout_offsets(ss, 0, m.rollout_generators(64, 6))
    x0 = torch.zeros(4, 16, 4, 4)
    before = m.noise_and_sigmas(x0, 5)
    m.rollout_generators(4, 5)
    after = m.noise_and_sigmas(x0, 5)  # the rollout's draws leave the noise and sigmas alone
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_problems_name_the_field_and_the_fix():
    assert ScheduledSamplingConfig().problems() == []
    lines = ScheduledSamplingConfig(max_step_offset=-1, probability=1.5, sampler="heun", grid_steps=0).problems()
    assert lines == [
        "scheduled_sampling.max_step_offset=-1 must be a whole number >= 0; e.g. scheduled_sampling.max_step_offset=5",
        "scheduled_sampling.probability=1.5 must lie in [0, 1]; e.g. scheduled_sampling.probability=0.5",
        "scheduled_sampling.grid_steps=0 must be a whole number >= 1; e.g. scheduled_sampling.grid_steps=28",
        "scheduled_sampling.sampler='heun' is unknown; use euler, unipc, dpm",
    ]
    assert "rolls nothing out" in ScheduledSamplingConfig(max_step_offset=3).problems()[0]


def test_a_short_run_with_a_scheme_huber_and_rollout_trains(tiny_model_cfg):
    L.seed_everything(0, verbose=False)
    module = FluxLoRAModule(
        tiny_model_cfg,
        lora(),
        TimestepConfig(weighting_scheme="cosmap", flow_schedule_shift=2.0),
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        loss=LossConfig(loss_type="huber", huber_c=0.2),
        scheduled_sampling=ScheduledSamplingConfig(max_step_offset=3, probability=0.5, grid_steps=8, sampler="dpm"),
    )
    loader = torch.utils.data.DataLoader(BatchDataset(), batch_size=2)
    trainer(2).fit(module, loader)
    assert (
        module.hparams["scheduled_sampling"]["max_step_offset"] == 3 and module.hparams["loss"]["loss_type"] == "huber"
    )
    assert module.recent_train_loss() == module.recent_train_loss()  # finite, not NaN
    b_params = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in b_params)  # lora_B starts at zero: it trained
    assert replace(module.timesteps).weighting is None  # the scheme, not a resolved weighting, drew sigma
