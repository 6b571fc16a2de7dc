"""Peak memory of a training step at FLUX.1's real widths: flux_lightning beside diffusers' script.

The model is ``flux_lightning.model.tiny.ensure_real_width_folder``: FLUX.1-dev's transformer config
(24 heads x 128 = 3072 wide, T5 width 4096, CLIP pooled 768, guidance embedding) with 1 double and
2 single blocks, random weights saved in bf16 (about 0.7B parameters), tiny encoders with those
output widths and the tiny 16-channel VAE. Every per-token tensor of a step has its FLUX.1-dev
size, so on the CPU the RSS of a step is what the same step holds on a GPU (plus the process's
libraries), block for block.

Cells: 256 and 512 px x gradient checkpointing off / on x {reference, flux_lightning}, each a fresh
process (``_peak_probe.py``: RSS high-water of ``--steps`` whole training steps, reset after
loading, so loading and caching peaks are reported apart). Settings as in ``vs_reference.py``
except: bf16 weights with bf16 autocast (``--mixed_precision bf16`` / ``model.dtype=bf16
trainer.precision=bf16-mixed``), LoRA rank 16 on the script's 12 default targets, 2 images.

    PYTHONPATH=. python benchmarks/memory_vs_reference.py --reference /tmp/ref/train_dreambooth_lora_flux.py \\
        --json benchmarks/results/memory_vs_reference.json         # ~20 min on 2 cores, up to ~6 GB RSS

The reference is diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` (a copy you
supply; never committed). ``--only flux_lightning`` runs our side alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vs_reference
from _common import machine, save_json, table
from vs_reference import check_reference, environment

HERE = Path(__file__).resolve().parent
MIB = 1024**2


def reference_command(
    script: Path, model: Path, data: Path, out: Path, steps: int, px: int, gc: bool, rank: int
) -> list[str]:
    """vs_reference's command at ``px``, ``rank`` and bf16, with one step more (``_peak_probe.py`` stops
    at step ``steps + 1``'s forward) and without the interpreter (the probe runs the script itself)."""
    cmd = vs_reference.reference_command(
        script, model, data, out, steps + 1, resolution=px, rank=rank, mixed_precision="bf16", gradient_checkpointing=gc
    )
    return cmd[1:]


def flux_lightning_command(model: Path, data: Path, out: Path, steps: int, px: int, gc: bool, rank: int) -> list[str]:
    """vs_reference's flux_lightning command at ``px``, ``rank`` and bf16, with one step more, without the
    interpreter (the probe runs the module itself)."""
    cmd = vs_reference.flux_lightning_command(model, data, out, steps + 1, gc, resolution=px, rank=rank, bf16=True)
    return cmd[1:]


def run_cell(trainer: str, args, model: Path, data: Path, px: int, gc: bool, work: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{trainer}-{px}-{int(gc)}-", dir=work))
    if trainer == "reference":
        cmd = reference_command(args.reference, model, data, out, args.steps, px, gc, args.rank)
    else:
        cmd = flux_lightning_command(model, data, out, args.steps, px, gc, args.rank)
    result_file = out / "peak.json"
    log = out / "log.txt"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, str(HERE / "_peak_probe.py"), str(result_file), str(args.steps), *cmd],
            cwd=out,
            env=environment(args.threads, "cpu"),
            stdout=f,
            stderr=subprocess.STDOUT,
        ).returncode
    if rc != 0 or not result_file.is_file():
        raise SystemExit(f"{trainer} {px}px gc={gc}: exit {rc}\n{log.read_text(errors='replace')[-3000:]}")
    result = json.loads(result_file.read_text())
    result.update(
        trainer=trainer,
        px=px,
        gradient_checkpointing=gc,
        wall_s=time.perf_counter() - start,
        load_before=load,
        load_after=os.getloadavg()[0],
    )
    print(
        f"{trainer:15s} {px:4d}px gc={int(gc)}: step peak {result['step_peak_bytes'] / MIB:8.0f} MiB "
        f"(before steps {result['rss_before_steps_bytes'] / MIB:.0f}, load peak {result['load_peak_bytes'] / MIB:.0f})",
        flush=True,
    )
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, help="diffusers' train_dreambooth_lora_flux.py (your copy)")
    p.add_argument("--only", choices=["flux_lightning", "reference"], help="one trainer only")
    p.add_argument("--px", type=int, nargs="+", default=[256, 512])
    p.add_argument("--gc", choices=["off", "on"], nargs="+", default=["off", "on"])
    p.add_argument("--steps", type=int, default=1, help="training steps measured per cell (after loading)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flux_lightning_memory_bench")
    p.add_argument("--json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    trainers = [args.only] if args.only else ["reference", "flux_lightning"]
    if "reference" in trainers:
        check_reference(args.reference)
    from flux_lightning.data.demo import make_demo_dataset
    from flux_lightning.model.tiny import ensure_real_width_folder

    args.work.mkdir(parents=True, exist_ok=True)
    model = ensure_real_width_folder(args.work / "models")
    data = {px: make_demo_dataset(args.work / "data", count=2, size=px) for px in args.px}
    cells = []
    for px in args.px:
        for gc in args.gc:
            for trainer in trainers:
                cells.append(run_cell(trainer, args, model, data[px], px, gc == "on", args.work))
    rows = []
    for px in args.px:
        for gc in args.gc:
            pick = {c["trainer"]: c for c in cells if c["px"] == px and c["gradient_checkpointing"] == (gc == "on")}
            row = [f"{px}", gc]
            for t in ("reference", "flux_lightning"):
                c = pick.get(t)
                row += [f"{c['step_peak_bytes'] / MIB:.0f} ({c['rss_before_steps_bytes'] / MIB:.0f})" if c else "-"]
            if len(pick) == 2:
                row.append(f"{pick['flux_lightning']['step_peak_bytes'] / pick['reference']['step_peak_bytes']:.3f}")
            rows.append(row)
    print(
        table(
            [
                "px",
                "gradient checkpointing",
                "reference step peak MiB (RSS before)",
                "flux_lightning step peak MiB (RSS before)",
                "ratio",
            ],
            rows,
        )
    )
    result = {"machine": machine(), "threads": args.threads, "steps": args.steps, "rank": args.rank, "cells": cells}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
