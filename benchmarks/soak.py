"""Soak test: a long default run, checkpointing often, must stay flat in memory, file descriptors and disk.

Runs ``python -m flux_lightning`` (the embedded default: tiny Flux on the demo data, every default
callback: validation images, eval loss, LoRA export, TensorBoard) for ``--steps`` steps with a
checkpoint every ``--every`` steps, and samples the training process tree every ``--interval``
seconds:

* RSS: resident memory of the process and its children (dataloader workers), MiB;
* open file descriptors of the process and its children;
* disk use of the run dir (checkpoints, LoRA, validation images, logs), MiB.

A leak shows as growth from the first quarter of the run to the last. The summary gives, for each
series, the mean of the first and of the last quarter of the samples, their ratio and the maximum;
``save_top_k`` (5) bounds the checkpoints, so the run dir grows only by validation images and logs.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/soak.py --steps 2000 --json benchmarks/results/soak.json
    PYTHONPATH=. python benchmarks/soak.py --short        # a few seconds of the same code path (tests)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import machine, save_json, table

REPO = Path(__file__).resolve().parents[1]


def command(run_dir: Path, cache: Path, steps: int, every: int, short: bool) -> list[str]:
    """The default run with frequent checkpoints (``--short``: no validation/eval, a few steps)."""
    cmd = [
        sys.executable,
        "-m",
        "flux_lightning",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache}",
        f"trainer.max_steps={steps}",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "+trainer.enable_progress_bar=false",
    ]
    if short:
        cmd += ["callbacks.validation=null", "callbacks.clip_score=null", "callbacks.eval_loss=null", "logger=csv"]
    return cmd


def disk_use(folder: Path) -> int:
    """Bytes of every regular file under ``folder`` (files vanishing while walking are skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def sample(proc: psutil.Process, run_dir: Path, t0: float) -> dict | None:
    """One sample of the process tree and the run dir; None once the process is gone."""
    try:
        children = proc.children(recursive=True)
        rss, fds = proc.memory_info().rss, proc.num_fds()
    except psutil.NoSuchProcess:  # the run just ended
        return None
    if rss == 0 or fds == 0:  # ended but not yet reaped (a zombie reads as 0 MiB, 0 fds)
        return None
    tree = [proc, *children]
    for p in children:  # dataloader workers; one may end between listing and reading
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    ckpts = run_dir / "checkpoints"
    n_ckpt = len(list(ckpts.glob("*.ckpt"))) if ckpts.is_dir() else 0
    return {
        "t": round(time.monotonic() - t0, 2),
        "rss_mib": round(rss / 2**20, 1),
        "fds": fds,
        "disk_mib": round(disk_use(run_dir) / 2**20, 2),
        "checkpoints": n_ckpt,
        "processes": len(tree),
    }


def summarise(samples: list[dict], key: str) -> dict:
    """First-quarter mean, last-quarter mean, their ratio and the maximum of one series."""
    values = [s[key] for s in samples]
    q = max(1, len(values) // 4)
    first, last = sum(values[:q]) / q, sum(values[-q:]) / q
    return {
        "first_quarter": round(first, 2),
        "last_quarter": round(last, 2),
        "ratio": round(last / first, 3) if first else None,
        "max": max(values),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (trainer.max_steps)")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every n steps")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--short", action="store_true", help="30 steps, no validation: checks the code path")
    parser.add_argument("--dir", help="where the run and cache dirs go (default: a temporary folder)")
    parser.add_argument("--json", help="write the samples and summary here")
    args = parser.parse_args()
    if args.short:
        args.steps, args.interval = min(args.steps, 30), min(args.interval, 0.2)

    root = Path(args.dir or tempfile.mkdtemp(prefix="flux_lightning_soak_"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir, cache = root / "run", root / "cache"
    cmd = command(run_dir, cache, args.steps, args.every, args.short)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(root / "soak.log", "w")
    t0 = time.monotonic()
    child = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc = psutil.Process(child.pid)
    samples = []
    while child.poll() is None:
        s = sample(proc, run_dir, t0)
        if s is not None and child.poll() is None:
            samples.append(s)
        time.sleep(args.interval)
    wall = time.monotonic() - t0
    log.close()
    if child.returncode != 0 or len(samples) < 4:
        print((root / "soak.log").read_text()[-3000:], file=sys.stderr)
        print(
            f"soak run failed (exit {child.returncode}, {len(samples)} samples); log: {root / 'soak.log'}",
            file=sys.stderr,
        )
        return 1

    # the first seconds are start-up (imports, caching): the flat-ness is judged once training runs
    training = [s for s in samples if s["checkpoints"] > 0] or samples
    summary = {k: summarise(training, k) for k in ("rss_mib", "fds", "disk_mib")}
    result = {
        "benchmark": "soak",
        "machine": machine(),
        "command": " ".join(cmd[1:]),
        "steps": args.steps,
        "checkpoint_every": args.every,
        "wall_s": round(wall, 1),
        "samples_total": len(samples),
        "samples_training": len(training),
        "final_disk_mib": samples[-1]["disk_mib"],
        "summary": summary,
        "samples": samples,
    }
    save_json(args.json, result)
    rows = [[k, v["first_quarter"], v["last_quarter"], v["ratio"], v["max"]] for k, v in summary.items()]
    print(
        f"soak: {args.steps} steps, checkpoint every {args.every}, {wall:.0f} s, {len(training)} samples while training"
    )
    print(table(["series", "first quarter (mean)", "last quarter (mean)", "last / first", "max"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
