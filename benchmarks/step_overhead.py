"""Seconds per training step: flux_lightning's Lightning loop vs a bare PyTorch loop, same math.

Both loops train the same small Flux (4 double + 8 single blocks, width 256, 256 image tokens, 64
text tokens; rank-16 LoRA on `all`, dropout 0.1, gradient checkpointing) on the same batches held in
memory, with AdamW, gradient clipping at 1.0 and the same flow-matching step. The Lightning side is
what a user runs: ``FluxLoRAModule`` in ``lightning.Trainer`` with the loss progress bar and a CSV
logger every 10 steps. The bare side calls the same transformer in a ``for`` loop. Rounds alternate
between the two so that load from other processes hits both alike; each round drops its first
steps (warm-up). Reports the median s/step of each and their ratio (target <= 1.05).

    PYTHONPATH=. python benchmarks/step_overhead.py [--steps 25 --rounds 2 --threads 1 --json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial

import lightning as L
import torch
from _common import batches, machine, median, model_config, save_json, small_flux_folder, table

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.callbacks import LossProgressBar
from flux_lightning.training.flow import (
    TimestepConfig,
    flow_loss,
    flow_target,
    image_ids,
    noisy_latents,
    pack_latents,
    sample_sigmas,
    text_ids,
    unpack_latents,
)

IMAGE_TOKENS = 256
WARMUP = 3


def make_module(folder) -> FluxLoRAModule:
    torch.manual_seed(0)
    module = FluxLoRAModule(
        model_config(folder),
        AdapterConfig(rank=16, target="all"),
        TimestepConfig(),
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
    )
    module.configure_model()
    return module


class StepClock(L.Callback):
    """Wall time between consecutive batch starts (data fetch + step + every hook)."""

    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, *args):
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args):
        self.starts.append(time.perf_counter())

    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def lightning_round(folder, data, steps: int, log_dir: str) -> list[float]:
    module = make_module(folder)
    clock = StepClock()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision="32-true",
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        logger=L.pytorch.loggers.CSVLogger(log_dir),
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[clock, LossProgressBar(refresh_rate=10)],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    return clock.times()[min(WARMUP, steps - 1) :]


def bare_round(folder, data, steps: int) -> list[float]:
    transformer = make_module(folder).transformer
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    timesteps = TimestepConfig()
    times, last = [], time.perf_counter()
    for step, batch in enumerate(torch.utils.data.DataLoader(data, batch_size=1)):
        if step == steps:
            break
        x0 = batch["latents"]
        b, _, h, w = x0.shape
        noise = torch.randn_like(x0)
        sigmas = sample_sigmas(b, timesteps, seq_len=(h // 2) * (w // 2))
        pred = transformer(
            hidden_states=pack_latents(noisy_latents(x0, noise, sigmas)),
            timestep=sigmas,
            guidance=torch.ones(b),
            pooled_projections=batch["pooled_prompt_embeds"],
            encoder_hidden_states=batch["prompt_embeds"],
            txt_ids=text_ids(batch["prompt_embeds"].shape[1]),
            img_ids=image_ids(h, w),
            return_dict=False,
        )[0]
        loss = flow_loss(unpack_latents(pred, h, w), flow_target(x0, noise)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[min(WARMUP, steps - 1) :]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="steps per round (the first 3 are warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = small_flux_folder(tmp)
        data = batches(args.steps, IMAGE_TOKENS)
        lit, bare, rounds = [], [], []
        for r in range(args.rounds):
            lt = lightning_round(folder, data, args.steps, f"{tmp}/logs")
            bt = bare_round(folder, data, args.steps)
            lit += lt
            bare += bt
            rounds.append((r, median(lt), median(bt)))
            print(f"round {r}: flux_lightning {median(lt):.4f} s/step, bare {median(bt):.4f} s/step", flush=True)

    result = {
        "benchmark": "step_overhead",
        "machine": machine(),
        "image_tokens": IMAGE_TOKENS,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "flux_lightning_s_per_step": median(lit),
        "bare_pytorch_s_per_step": median(bare),
        "ratio": median(lit) / median(bare),
        "per_round": [{"round": r, "flux_lightning": a, "bare": b} for r, a, b in rounds],
    }
    print()
    print(f"machine: {result['machine']}")
    print(
        table(
            ["loop", "median s/step", "ratio"],
            [
                ["bare PyTorch", f"{result['bare_pytorch_s_per_step']:.4f}", "1.00"],
                [
                    "flux_lightning (Lightning Trainer)",
                    f"{result['flux_lightning_s_per_step']:.4f}",
                    f"{result['ratio']:.3f}",
                ],
            ],
        )
    )
    print(f"target: ratio <= 1.05 -> {'met' if result['ratio'] <= 1.05 else 'NOT met'}")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
