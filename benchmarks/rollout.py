"""Cost of scheduled sampling (rollout): seconds per training step with rollout vs a plain step.

The small Flux of ``step_overhead.py`` (4 double + 8 single blocks, width 256, 64 text tokens;
rank-16 LoRA on `all`, gradient checkpointing on) trains once plainly and once with the issue's
rollout setting ``scheduled_sampling.max_step_offset=5 probability=0.5`` (Euler; unipc/dpm make the same
model calls plus a per-sample scheduler step; the default 28-step grid): half of the samples are first denoised by the current weights over 1..5 grid steps
(uniform), i.e. about 1.5 extra no-gradient forward passes per sample on average (fewer where a
training sigma lies near the top of the grid). A step is ``FluxLoRAModule.training_step`` +
backward + AdamW step; both modules see the same batch and batch index at each step, so they draw
the same sigmas and noise. Steps of the two settings alternate so that load from other processes
hits both alike; the first step of each is warm-up. A rollout step's cost depends on the draw, so
the figure is the mean s/step over the timed steps (the median is reported too), and the share of
rolled-out samples actually drawn is printed beside it.

    PYTHONPATH=. python benchmarks/rollout.py [--tokens 256 --steps 40 --batch 1 --threads 1 --json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from _common import batches, machine, median, model_config, save_json, small_flux_folder, table

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.training.rollout import ScheduledSamplingConfig, rollout_offsets, rollout_path, sigma_grid

warnings.filterwarnings("ignore", message=".*self.trainer. reference is not registered")

ROLLOUT = ScheduledSamplingConfig(max_step_offset=5, probability=0.5, sampler="euler")


class Trainee:
    """One module + optimizer; :meth:`step` runs and times one full training step."""

    def __init__(self, folder, scheduled_sampling):
        torch.manual_seed(0)
        self.module = FluxLoRAModule(
            model_config(folder), AdapterConfig(rank=16, target="all"), scheduled_sampling=scheduled_sampling
        )
        self.module.configure_model()
        self.module.train()
        self.optimizer = torch.optim.AdamW(self.module.trainable_parameters(), lr=1e-4)

    def step(self, batch, batch_idx: int) -> tuple[float, float]:
        """(wall s, CPU s of this process) of one step; with one thread the CPU figure barely moves
        with the load of other processes."""
        start, cpu = time.perf_counter(), time.process_time()
        loss = self.module.training_step(batch, batch_idx)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (a square number)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    samples = batches(1, args.tokens, batch_size=args.batch)
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = small_flux_folder(tmp)
        runs = {"plain": Trainee(folder, None), "rollout": Trainee(folder, ROLLOUT)}
        times = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        rolled = extra_calls = 0
        for i in range(args.steps + 1):
            for name, trainee in runs.items():
                t, c = trainee.step(batch, i)
                if i:  # the first step of each is warm-up
                    times[name].append(t)
                    cpu[name].append(c)
            if i:  # what the rollout step drew: samples rolled out, extra forward passes (exact)
                module = runs["rollout"].module
                offsets = rollout_offsets(ROLLOUT, 0, module.rollout_generators(args.batch, i))
                sigmas = module.noise_and_sigmas(batch["latents"], i)[1].tolist()
                grid = sigma_grid(ROLLOUT, module.timesteps, args.tokens)
                rolled += sum(k > 0 for k in offsets)
                extra_calls += sum(len(rollout_path(grid, s, k)) - 1 for s, k in zip(sigmas, offsets))
    plain, roll = statistics.mean(times["plain"]), statistics.mean(times["rollout"])
    share = rolled / (args.steps * args.batch)
    result = {
        "benchmark": "rollout", "machine": machine(), "image_tokens": args.tokens, "batch": args.batch,
        "rollout": vars(ROLLOUT), "plain_s_per_step": plain, "rollout_s_per_step": roll, "ratio": roll / plain,
        "plain_median": median(times["plain"]), "rollout_median": median(times["rollout"]),
        "plain_cpu_s_per_step": statistics.mean(cpu["plain"]), "rollout_cpu_s_per_step": statistics.mean(cpu["rollout"]),
        "cpu_ratio": statistics.mean(cpu["rollout"]) / statistics.mean(cpu["plain"]),
        "rolled_out_share": share, "extra_forwards_per_sample": extra_calls / (args.steps * args.batch),
        "steps": times, "cpu_steps": cpu,
    }  # fmt: skip
    print()
    print(f"machine: {result['machine']}")
    print(
        table(
            ["image tokens", "batch", "plain s/step (mean, median)", "rollout 5 / 0.5 s/step (mean, median)",
             "ratio (means)", "CPU s/step ratio", "samples rolled out"],
            [[args.tokens, args.batch, f"{plain:.3f}, {result['plain_median']:.3f}",
              f"{roll:.3f}, {result['rollout_median']:.3f}", f"{roll / plain:.2f}x", f"{result['cpu_ratio']:.2f}x", f"{share:.2f}"]],
        )
    )  # fmt: skip
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
