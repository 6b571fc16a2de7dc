"""Multi-GPU strategies on a Flux-shaped model: s/step and peak memory per rank for ddp, fsdp, deepspeed.

    python benchmarks/gpu_multi.py [--gpus N] [--preset dev|small] [--steps 12] [--json out.json]

Needs a machine with >= 2 CUDA GPUs (not run by CI; never downloads anything). For each strategy it
starts ``torchrun``-free Lightning training with ``devices=N``: the transformer is built from a
FLUX.1-dev-shaped config with random weights (``--preset dev``: 19 double + 38 single blocks,
width 3072, about 12B parameters; ``small``: 2 + 4 blocks, for a quick try), a rank-16 LoRA on
target ``all``, bf16-mixed, gradient checkpointing, batch 1 of random 512 px latents (1024 image
tokens, 512 text tokens) fed in memory, AdamW. Strategies: ``ddp``, ``fsdp``
(``flux_lightning.training.strategies.fsdp``: one FSDP unit per Flux block, ``use_orig_params``), and
``deepspeed_stage_2`` / ``deepspeed_stage_3`` when DeepSpeed is installed (skipped otherwise).
Each rank prints one JSON line (``s_per_step``: median of the steps after ``--warmup``;
``peak_gib``: ``torch.cuda.max_memory_allocated``); the parent collects them into a table.
A strategy that fails (e.g. out of memory) is reported with its error and the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# FLUX.1-dev's transformer (flux_lightning.model.forecast.FLUX1_TRANSFORMER), whole or 2 + 4 blocks
PRESETS = {"dev": {}, "small": {"num_layers": 2, "num_single_layers": 4}}


def _rank(args) -> None:
    """One Lightning run (Lightning starts the other ranks from this command line)."""
    import lightning as L
    import torch
    from diffusers import FluxTransformer2DModel

    from flux_lightning.adapters import AdapterConfig, add_adapter
    from flux_lightning.model.forecast import FLUX1_TRANSFORMER
    from flux_lightning.model.memory import enable_gradient_checkpointing

    class Flux(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.transformer = None

        def configure_model(self):
            if self.transformer is not None:
                return
            with torch.device("cuda", torch.cuda.current_device()):
                t = FluxTransformer2DModel(**{**FLUX1_TRANSFORMER, **PRESETS[args.preset]}).to(torch.bfloat16)
            t.requires_grad_(False)
            add_adapter(t, AdapterConfig(rank=16, target="all", dropout=0.0), dtype=torch.float32)
            enable_gradient_checkpointing(t, 1, early_stop=True)
            self.transformer = t.train()

        def training_step(self, batch, i):
            cfg = self.transformer.config if hasattr(self.transformer, "config") else self.transformer.module.config
            g = torch.Generator(device=self.device).manual_seed(i)
            x = torch.randn(1, 1024, 64, device=self.device, generator=g, dtype=torch.bfloat16)
            out = self.transformer(
                hidden_states=x,
                encoder_hidden_states=torch.randn(
                    1, 512, cfg.joint_attention_dim, device=self.device, dtype=torch.bfloat16
                ),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=self.device, dtype=torch.bfloat16),
                timestep=torch.rand(1, device=self.device),
                img_ids=torch.zeros(1024, 3, device=self.device),
                txt_ids=torch.zeros(512, 3, device=self.device),
                guidance=torch.full((1,), 3.5, device=self.device),
                return_dict=False,
            )[0]
            return (out.float() - x.float()).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    class Clock(L.Callback):
        def __init__(self):
            self.t, self.times = None, []

        def on_train_start(self, trainer, module):
            torch.cuda.reset_peak_memory_stats()  # training only, not the unsharded build

        def on_train_batch_start(self, trainer, *a):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, *a):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

        def on_train_end(self, trainer, module):
            steps = self.times[args.warmup :] or self.times
            print(
                "RESULT "
                + json.dumps(
                    {
                        "strategy": args.strategy,
                        "rank": trainer.global_rank,
                        "world": trainer.world_size,
                        "s_per_step": round(statistics.median(steps), 4),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    }
                ),
                flush=True,
            )

    strategy = args.strategy
    if strategy == "fsdp":
        from flux_lightning.training.strategies import fsdp

        strategy = fsdp(state_dict_type="full")
    loader = torch.utils.data.DataLoader(range(10_000), batch_size=1)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=args.gpus,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
        use_distributed_sampler=False,
    )
    trainer.fit(Flux(), loader)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=None, help="default: every visible GPU")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="dev")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--strategies", default="ddp,fsdp,deepspeed_stage_2,deepspeed_stage_3")
    ap.add_argument("--strategy", help=argparse.SUPPRESS)  # one rank's run
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.strategy:
        return _rank(args)
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise SystemExit("benchmarks/gpu_multi.py needs a machine with at least 2 CUDA GPUs")
    gpus = args.gpus or torch.cuda.device_count()
    rows = []
    for name in args.strategies.split(","):
        if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            rows.append({"strategy": name, "error": "deepspeed not installed (pip install deepspeed)"})
            continue
        cmd = [
            sys.executable,
            __file__,
            "--strategy",
            name,
            "--gpus",
            str(gpus),
            "--preset",
            args.preset,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"strategy": name, "error": last[:300]})
        rows += sorted(found, key=lambda r: r["rank"])
    print(f"{'strategy':<20} {'rank':>4} {'s/step':>8} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['strategy']:<20}  failed: {r['error']}")
        else:
            print(f"{r['strategy']:<20} {r['rank']:>4} {r['s_per_step']:>8.3f} {r['peak_gib']:>9.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"gpus": gpus, "preset": args.preset, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
