"""Scheduled sampling ("rollout"): train some samples on latents the model denoised itself.

For a rolled-out sample the training sigma ``sigma_t`` is drawn as usual; the source sigma lies up to
``max_step_offset`` steps further toward noise on the rollout grid (the sampler's ``grid_steps``-step
sigma grid ``linspace(1, 1/N, N)``, shifted like training, then 0, as diffusers'
``FlowMatchEulerDiscreteScheduler`` builds it). The sample's own noise takes ``x0`` to the source sigma,
the current weights (no gradient, adapters on, the flavour's conditioning) denoise it over the grid
sigmas between source and target, ending exactly at ``sigma_t``, and the usual step trains on that
latent with the usual target ``noise - x0`` (SimpleTuner's documentation, "Scheduled Sampling
(Rollout)", gives the method and the option names).

Which samples roll out, and how far, is drawn from a generator keyed like the training noise (seed,
epoch, batch, sample index; see ``FluxLoRAModule.rollout_generator``), so a resumed run rolls out the
same samples. The decision is :func:`rollout_offsets`, a pure function of the step and the generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import Problem
from .flow import TimestepConfig, shift_like_training

SAMPLERS = ("euler", "unipc", "dpm")


@dataclass
class ScheduledSamplingConfig:
    """Scheduled sampling (rollout), with SimpleTuner's ``scheduled_sampling_*`` option names.

    Attributes:
        max_step_offset: the longest rollout in grid steps; a rolled-out sample's length is drawn
            uniformly from 1..max_step_offset. 0 (default) = off: the step is exactly the plain one.
        probability: the chance that a sample of the batch rolls out (0..1), used when
            ``ramp_steps`` is 0.
        ramp_steps: > 0 ramps the chance linearly from ``prob_start`` to ``prob_end`` over this many
            optimizer steps (then it stays at ``prob_end``); ``probability`` is not used.
        prob_start: the chance at step 0 of the ramp (SimpleTuner's default 0.0).
        prob_end: the chance from step ``ramp_steps`` on (SimpleTuner's default 0.5).
        sampler: the solver of the rollout steps: ``euler`` (diffusers' FlowMatchEulerDiscreteScheduler
            step ``x + (sigma_next - sigma) v``), ``unipc`` (diffusers' UniPCMultistepScheduler) or
            ``dpm`` (diffusers' DPMSolverMultistepScheduler, DPM-Solver++ 2M), both on flow sigmas with
            flow predictions and given the sample's own path, which ends at its training sigma. A
            one-step rollout is the same Euler step for all three. Default ``unipc``, SimpleTuner's.
        grid_steps: N, the number of steps of the rollout grid (the sampler's N-step schedule; 28 as
            Flux.1-dev's pipeline default). A step offset of k starts k grid points above sigma_t.
    """

    max_step_offset: int = 0
    probability: float = 0.0
    ramp_steps: int = 0
    prob_start: float = 0.0
    prob_end: float = 0.5
    sampler: str = "unipc"
    grid_steps: int = 28

    @property
    def enabled(self) -> bool:
        return self.max_step_offset > 0

    def problems(self) -> list[Problem]:
        out = []
        f = "scheduled_sampling."
        for name in ("max_step_offset", "ramp_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                out.append(Problem(f"{f}{name}", f"{f}{name}={v!r} must be a whole number >= 0; e.g. {f}{name}=5"))
        for name in ("probability", "prob_start", "prob_end"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                out.append(Problem(f"{f}{name}", f"{f}{name}={v!r} must lie in [0, 1]; e.g. {f}{name}=0.5"))
        if isinstance(self.grid_steps, bool) or not isinstance(self.grid_steps, int) or self.grid_steps < 1:
            out.append(
                Problem(
                    f"{f}grid_steps",
                    f"{f}grid_steps={self.grid_steps!r} must be a whole number >= 1; e.g. {f}grid_steps=28",
                )
            )
        if self.sampler not in SAMPLERS:
            out.append(Problem(f"{f}sampler", f"{f}sampler={self.sampler!r} is unknown; use {', '.join(SAMPLERS)}"))
        if not out and self.enabled and self.ramp_steps == 0 and self.probability == 0:
            out.append(
                Problem(
                    f"{f}probability",
                    f"{f}max_step_offset={self.max_step_offset} rolls nothing out with {f}probability=0; set "
                    f"{f}probability (e.g. 0.5), or {f}ramp_steps with prob_start/prob_end",
                )
            )
        return out

    def probability_at(self, step: int) -> float:
        """The chance that a sample rolls out at optimizer step ``step`` (the ramp, else ``probability``)."""
        if self.ramp_steps > 0:
            t = min(max(step, 0) / self.ramp_steps, 1.0)
            return self.prob_start + (self.prob_end - self.prob_start) * t
        return self.probability


def rollout_offsets(config: ScheduledSamplingConfig, step: int, generators: list[torch.Generator]) -> list[int]:
    """Each sample's rollout length in grid steps (0 = trained as usual), one draw pair per generator:
    ``u ~ U(0, 1)`` rolls out when ``u < probability_at(step)``, then the length ~ U{1..max_step_offset}."""
    p = config.probability_at(step)
    out = []
    for g in generators:
        u = torch.rand((), generator=g).item()
        k = int(torch.randint(1, config.max_step_offset + 1, (), generator=g))
        out.append(k if u < p else 0)
    return out


def sigma_grid(config: ScheduledSamplingConfig, timesteps: TimestepConfig, seq_len: int) -> torch.Tensor:
    """The rollout grid ``(N + 1,)``: ``linspace(1, 1/N, N)`` shifted like training (auto shift for
    ``seq_len`` tokens, else the static shift; none for ``schnell_fast``), then 0."""
    n = config.grid_steps
    base = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    return torch.cat([shift_like_training(base, timesteps, seq_len), base.new_zeros(1)])


def rollout_path(grid: torch.Tensor, sigma_t: float, offset: int) -> list[float]:
    """The sigmas a rollout of ``offset`` grid steps visits: from the grid point ``offset`` steps above
    ``sigma_t`` (fewer where the grid ends at 1) through the grid points above ``sigma_t`` to ``sigma_t``
    itself. ``[sigma_t]`` alone (no step) for offset 0 or a sigma at the top of the grid."""
    above = [float(s) for s in grid if s > sigma_t]  # descending, the grid points noisier than sigma_t
    return [*above[max(len(above) - offset, 0) :], float(sigma_t)] if offset > 0 else [float(sigma_t)]


Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def euler_rollout(velocity: Velocity, x: torch.Tensor, paths: list[list[float]]) -> torch.Tensor:
    """Step each sample of ``x`` ``(B, ...)`` along its own path of sigmas with Euler steps
    ``x <- x + (sigma_next - sigma) * v(x, sigma)`` (diffusers' FlowMatchEulerDiscreteScheduler.step).

    ``velocity(x_rows, sigma_rows, rows)`` predicts for the samples ``rows`` (a LongTensor of batch
    indices) still stepping; a path of length 1 takes no step. Computes in fp32, returns ``x``'s dtype.
    """
    x = x.float().clone()
    longest = max((len(p) for p in paths), default=1)
    for i in range(longest - 1):
        rows = [b for b, p in enumerate(paths) if len(p) - 1 > i]
        idx = torch.tensor(rows, device=x.device)
        sigma = torch.tensor([paths[b][i] for b in rows], device=x.device, dtype=torch.float32)
        nxt = torch.tensor([paths[b][i + 1] for b in rows], device=x.device, dtype=torch.float32)
        v = velocity(x[idx], sigma, idx).float()
        dt = (nxt - sigma).view(-1, *([1] * (x.ndim - 1)))
        x[idx] = x[idx] + dt * v
    return x


def multistep_scheduler(sampler: str, path: list[float]):
    """A diffusers multistep solver (``unipc``: UniPCMultistepScheduler, ``dpm``: DPMSolverMultistepScheduler
    with DPM-Solver++ 2M) on flow sigmas with flow predictions, set to step exactly along ``path``
    (descending sigmas; the last one is where it stops, not 0). diffusers' ``set_timesteps`` always ends
    a schedule at 0 (or sigma_min), so the schedule's sigmas and timesteps are set to the path after it."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    if sampler == "unipc":
        scheduler = UniPCMultistepScheduler(**flow)
    elif sampler == "dpm":
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow)
    else:
        raise ValueError(f"scheduled_sampling.sampler={sampler!r} is not a multistep solver; use unipc or dpm")
    steps = len(path) - 1
    scheduler.set_timesteps(num_inference_steps=steps)
    scheduler.sigmas = torch.tensor(path, dtype=torch.float32)
    scheduler.timesteps = torch.tensor(path[:-1], dtype=torch.float32) * scheduler.config.num_train_timesteps
    scheduler.num_inference_steps = steps
    return scheduler


def rollout(velocity: Velocity, x: torch.Tensor, paths: list[list[float]], sampler: str = "euler") -> torch.Tensor:
    """Step each sample of ``x`` along its own path of sigmas with ``sampler`` (see
    :class:`ScheduledSamplingConfig`); ``euler`` is :func:`euler_rollout`. The multistep solvers keep one
    diffusers scheduler per sample (their history is per sample); the model is still called once per
    step for all samples still stepping. Computes in fp32, returns ``x``'s dtype."""
    if sampler == "euler":
        return euler_rollout(velocity, x, paths)
    out = x.float().clone()
    solvers = {b: multistep_scheduler(sampler, p) for b, p in enumerate(paths) if len(p) > 1}
    longest = max((len(p) for p in paths), default=1)
    for i in range(longest - 1):
        rows = [b for b, p in enumerate(paths) if len(p) - 1 > i]
        idx = torch.tensor(rows, device=out.device)
        sigma = torch.tensor([paths[b][i] for b in rows], device=out.device, dtype=torch.float32)
        v = velocity(out[idx], sigma, idx).float()
        for j, b in enumerate(rows):
            solver = solvers[b]
            # a copy: the solvers keep the sample they were given (UniPC's corrector reads it next step)
            out[b] = solver.step(v[j : j + 1], solver.timesteps[i], out[b : b + 1].clone()).prev_sample[0]
    return out.to(x.dtype)


__all__ = [
    "multistep_scheduler",
    "rollout",
    "SAMPLERS",
    "ScheduledSamplingConfig",
    "euler_rollout",
    "rollout_offsets",
    "rollout_path",
    "sigma_grid",
]
