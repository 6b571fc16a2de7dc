"""TREAD speed-up: seconds per training step with selection_ratio 0.5 vs no routing.

The small Flux of ``step_overhead.py`` (4 double + 8 single blocks, width 256, 64 text tokens;
rank-16 LoRA on `all`, gradient checkpointing on) trains at 1024 and 4096 image tokens (512 px and
1024 px images), once without routing and once with the quickstart's route
``{selection_ratio: 0.5, start_layer_idx: 2, end_layer_idx: -2}`` (half of the image tokens skip
blocks 2..10 of 12). A step is ``FluxLoRAModule.training_step`` + backward + AdamW step. Steps of the
two settings alternate so that load from other processes hits both alike; the first step of each is
warm-up. Reports the median s/step and the speed-up (target >= 1.25x at 4096 tokens).

    PYTHONPATH=. python benchmarks/tread.py [--tokens 1024 4096 --steps 3 --threads 1 --json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch
from _common import batches, machine, median, model_config, save_json, small_flux_folder, table

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.model.tread import TreadConfig, TreadRoute

# training_step logs; outside a Trainer Lightning warns about it once per module
warnings.filterwarnings("ignore", message=".*self.trainer. reference is not registered")

ROUTE = TreadRoute(selection_ratio=0.5, start_layer_idx=2, end_layer_idx=-2)


class Trainee:
    """One module + optimizer; :meth:`step` runs and times one full training step."""

    def __init__(self, folder, routes):
        torch.manual_seed(0)
        self.module = FluxLoRAModule(
            model_config(folder), AdapterConfig(rank=16, target="all"), tread=TreadConfig(routes)
        )
        self.module.configure_model()
        self.module.train()
        self.optimizer = torch.optim.AdamW(self.module.trainable_parameters(), lr=1e-4)

    def step(self, batch) -> float:
        start = time.perf_counter()
        loss = self.module.training_step(batch, 0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def measure(folder, tokens: int, steps: int) -> dict:
    batch = {k: v[None] for k, v in batches(1, tokens)[0].items()}
    runs = {"none": Trainee(folder, []), "tread": Trainee(folder, [ROUTE])}
    times = {name: [] for name in runs}
    for i in range(steps + 1):
        for name, trainee in runs.items():
            t = trainee.step(batch)
            if i:  # the first step of each is warm-up
                times[name].append(t)
    base, routed = median(times["none"]), median(times["tread"])
    print(
        f"{tokens} image tokens: none {base:.3f} s/step, tread {routed:.3f} s/step, speed-up {base / routed:.2f}x",
        flush=True,
    )
    return {
        "image_tokens": tokens,
        "none_s_per_step": base,
        "tread_s_per_step": routed,
        "speedup": base / routed,
        "steps": times,
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="image tokens (squares)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = small_flux_folder(tmp)
        cases = [measure(folder, tokens, args.steps) for tokens in args.tokens]
    result = {"benchmark": "tread", "machine": machine(), "route": vars(ROUTE), "cases": cases}
    print()
    print(f"machine: {result['machine']}")
    print(
        table(
            ["image tokens", "no routing s/step", "TREAD 0.5 s/step", "speed-up"],
            [
                [
                    c["image_tokens"],
                    f"{c['none_s_per_step']:.3f}",
                    f"{c['tread_s_per_step']:.3f}",
                    f"{c['speedup']:.2f}x",
                ]
                for c in cases
            ],
        )
    )
    at_4096 = [c["speedup"] for c in cases if c["image_tokens"] == 4096]
    if at_4096:
        print(f"target: >= 1.25x at 4096 tokens -> {'met' if at_4096[0] >= 1.25 else 'NOT met'}")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
