"""Timestep sampling schemes and loss weighting (diffusers' SD3 helpers), and the huber loss types."""

import math

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from hydra import compose, initialize_config_dir

from flux_lightning.config.validation import validate
from flux_lightning.errors import ConfigError
from flux_lightning.run.train import config_dir
from flux_lightning.training.flow import (
    LossConfig,
    TimestepConfig,
    flow_loss,
    loss_weights,
    sample_sigmas,
    shift_sigmas,
)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_scheme_draws_are_diffusers_draws_then_shifted(scheme):
    cfg = TimestepConfig(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.0)
    ours = sample_sigmas(4096, cfg, seq_len=16, generator=torch.Generator().manual_seed(5))
    theirs = compute_density_for_timestep_sampling(
        scheme, 4096, logit_mean=0.3, logit_std=0.8, mode_scale=1.0, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(ours, theirs)
    shifted = TimestepConfig(
        weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.0, flow_schedule_shift=3.0
    )
    drawn = sample_sigmas(4096, shifted, seq_len=16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, shift_sigmas(theirs, 3.0))


def test_scheme_distributions_have_their_documented_shape():
    g = torch.Generator().manual_seed(0)
    logit = sample_sigmas(
        20000, TimestepConfig(weighting_scheme="logit_normal", logit_mean=1.0, logit_std=0.5), seq_len=16, generator=g
    )
    assert torch.logit(logit).mean().item() == pytest.approx(1.0, abs=0.02)  # u is sigma: mean > 0 -> noisier
    assert torch.logit(logit).std().item() == pytest.approx(0.5, abs=0.02)
    mode = sample_sigmas(20000, TimestepConfig(weighting_scheme="mode", mode_scale=1.29), seq_len=16, generator=g)
    middle = ((mode > 0.25) & (mode < 0.75)).float().mean().item()
    assert middle > 0.6  # uniform would put 0.5 there: the mode scheme favours the middle
    assert mode.mean().item() == pytest.approx(0.5, abs=0.02)  # and is symmetric about 0.5
    uniform = sample_sigmas(20000, TimestepConfig(weighting_scheme="cosmap"), seq_len=16, generator=g)
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01) and uniform.std().item() == pytest.approx(
        12**-0.5, abs=0.01
    )


def test_loss_weights_are_diffusers_sd3_weights():
    sigmas = torch.linspace(0.05, 0.95, 7)
    for scheme in ("cosmap", "sigma_sqrt"):
        w = loss_weights(TimestepConfig(weighting_scheme=scheme), sigmas)
        torch.testing.assert_close(w, compute_loss_weighting_for_sd3(scheme, sigmas))
    assert loss_weights(TimestepConfig(weighting_scheme="cosmap"), torch.tensor([0.5])).item() == pytest.approx(
        4 / math.pi
    )
    for scheme in ("none", "logit_normal", "mode"):  # weights of 1: the loss is left untouched
        assert loss_weights(TimestepConfig(weighting_scheme=scheme), sigmas) is None


def test_huber_and_smooth_l1_are_the_pseudo_huber_formulas():
    pred = torch.tensor([[0.0, 0.01, 1.0, -3.0]])
    target = torch.zeros(1, 4)
    c = 0.5
    d = pred[0]
    huber = 2 * c * (torch.sqrt(d**2 + c**2) - c)
    smooth = 2 * (torch.sqrt(d**2 + c**2) - c)
    torch.testing.assert_close(flow_loss(pred, target, loss=LossConfig("huber", c)), huber.mean()[None])
    torch.testing.assert_close(flow_loss(pred, target, loss=LossConfig("smooth_l1", c)), smooth.mean()[None])
    torch.testing.assert_close(flow_loss(pred, target), (d**2).mean()[None])
    # huber: about d^2 well inside c, about 2c|d| far outside it (outliers pull linearly)
    e = flow_loss(torch.tensor([[0.01], [100.0]]), torch.zeros(2, 1), loss=LossConfig("huber", c))
    assert e[0].item() == pytest.approx(0.01**2, rel=1e-3) and e[1].item() == pytest.approx(
        2 * c * 100 - 2 * c * c, rel=1e-3
    )
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(flow_loss(pred, target, mask, LossConfig("huber", c)), (huber * mask[0]).mean()[None])


def test_bad_values_are_problems_naming_the_field():
    assert TimestepConfig().problems() == [] and LossConfig().problems() == []
    lines = TimestepConfig(weighting_scheme="lognorm").problems()
    assert len(lines) == 1 and lines[0].startswith(
        "timesteps.weighting_scheme='lognorm' is unknown; use none, logit_normal"
    )
    both = TimestepConfig(weighting="uniform", weighting_scheme="logit_normal").problems()
    assert len(both) == 1 and "both choose how sigma is drawn" in both[0]
    assert TimestepConfig(weighting_scheme="mode", logit_std=0.0, mode_scale=3.0).problems() == [
        "timesteps.logit_std=0.0 must be > 0; e.g. timesteps.logit_std=1.0",
        "timesteps.mode_scale=3.0 must lie in [-1.0, 1.752] (the mode density is monotone there); e.g. timesteps.mode_scale=1.29",
    ]
    assert LossConfig("mse", 0.0).problems() == [
        "loss.loss_type='mse' is unknown; use l2, huber, smooth_l1",
        "loss.huber_c=0.0 must be a number > 0; e.g. loss.huber_c=0.1",
    ]


def test_validate_reports_scheme_problems_and_schnells_fast_schedule(tmp_path):
    paths = [f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", "callbacks.eval_loss=null"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        ok = validate(
            compose("train", overrides=[*paths, "timesteps.weighting_scheme=cosmap", "loss.loss_type=huber"]),
            check_sources=False,
        )
        bad = compose(
            "train", overrides=[*paths, "model=schnell", "timesteps.weighting_scheme=logit_normal", "loss.huber_c=-1"]
        )
        with pytest.raises(ConfigError) as info:
            validate(bad, check_sources=False)
    assert ok.timesteps.weighting is None and ok.timesteps.weighting_scheme == "cosmap" and ok.loss.loss_type == "huber"
    text = str(info.value)
    assert "flavour schnell trains with its fast schedule but timesteps.weighting_scheme=logit_normal" in text
    assert "loss.huber_c=-1.0 must be a number > 0" in text
