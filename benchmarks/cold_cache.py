"""Cold-cache throughput: images per second from an empty cache to a ready dataset, 1 and 2 processes.

    python benchmarks/cold_cache.py [--images 96] [--rounds 3] [--procs 1,2] [--json out.json]

Each round starts every setting once (the settings alternate, so outside load hits them alike)
on a fresh cache: ``--images`` generated 768x512 JPEGs (noise over a gradient, so decoding and the
Lanczos resize cost what photos cost), the tiny flavour (random-weight VAE and text encoders built
offline, the models folder reused across rounds), ``dataset.resolution=256``, one caption per
image. A run is a real ``lightning.Trainer.fit`` with ``accelerator=cpu``, ``devices=N``
(``strategy=ddp`` over gloo for N > 1) and a one-parameter module; the time is from the first
rank entering ``prepare_data``/``setup`` to the last rank leaving ``setup`` (discovery, hashing,
verification, VAE latents, text embeddings, every barrier). Reported: median images/s per setting.

``--pin``: a rank stands for a GPU with its own cores. Each rank is pinned to one core of its own
(``os.sched_setaffinity``; rank r -> core r) and decodes in its own process (``dataset.num_workers=0``),
so one process has one core and two processes have two, as two GPUs' ranks each have theirs. That
isolates what the issue asks of the caching code: whether a second rank takes half the work (the
speed-up) or waits for rank 0 (none). Without ``--pin`` every rank may use every core, and on a
2-core machine one process with a decoding worker already uses both.

Run it against another checkout with ``PYTHONPATH=<checkout>`` (the "before" column of
benchmarks/README.md was measured that way on the commit before the rank-parallel caching).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 768, dtype=np.float32)[None, :, None]
    for i in range(n):
        arr = np.clip(ramp + rng.normal(0, 40, (512, 768, 3)) + i % 50, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"photo_{i:04d}.jpg", quality=90)


def _worker(data: str, cache: str, models: str, devices: int, out: str, pin: bool = False) -> None:
    """One training process (Lightning starts the other ranks from this command line)."""
    if pin:  # rank r on core r (a child rank inherits rank 0's mask first, then takes its own core)
        os.sched_setaffinity(0, {int(os.environ.get("LOCAL_RANK", "0")) % os.cpu_count()})
    import lightning as L
    import torch

    from flux_lightning import DatasetConfig, FluxDataModule, ModelConfig

    class Timed(FluxDataModule):
        def _mark(self, name):
            rank = self.trainer.global_rank if self.trainer else 0
            Path(out, f"{name}-{rank}").write_text(repr(time.time()))

        def prepare_data(self):
            self._mark("start")
            super().prepare_data()

        def setup(self, stage=None):
            if not Path(out, f"start-{self.trainer.global_rank}").exists():
                self._mark("start")
            super().setup(stage)
            self._mark("end")

    class One(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return (self.w**2).sum() + 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = ModelConfig(flavour="tiny", cache_dir=models)
    dm = Timed(
        DatasetConfig(
            instance_data_dir=data,
            resolution=256,
            cache_dir=cache,
            caption_strategy="filename",
            batch_size=1,
            eval_fraction=0.0,
            **({"num_workers": 0} if pin else {}),
        ),
        model,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(One(), dm)


def _one(root: Path, data: Path, procs: int, env: dict, pin: bool = False) -> float:
    cache, marks = root / f"cache-{procs}", root / f"marks-{procs}"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(marks, ignore_errors=True)
    marks.mkdir()
    cmd = [sys.executable, __file__, "--worker", str(data), str(cache), str(root / "models"), str(procs), str(marks)]
    cmd += ["--pin"] if pin else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    starts = [float(p.read_text()) for p in marks.glob("start-*")]
    ends = [float(p.read_text()) for p in marks.glob("end-*")]
    assert len(ends) == procs, (starts, ends)
    return max(ends) - min(starts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=5)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--pin", action="store_true", help="one core per rank, decoding in the rank (see above)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.worker:
        data, cache, models, devices, out = args.worker
        return _worker(data, cache, models, int(devices), out, args.pin)
    root = Path(tempfile.mkdtemp(prefix="flux-cold-cache-"))
    data = root / "data"
    _images(data, args.images)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    settings = [int(p) for p in args.procs.split(",")]
    _one(root, data, 1, env)  # builds the tiny models folder once, not timed
    times: dict[int, list[float]] = {p: [] for p in settings}
    for r in range(args.rounds):
        for p in settings if r % 2 == 0 else settings[::-1]:
            times[p].append(_one(root, data, p, env, args.pin))
            print(f"round {r}: {p} process(es): {times[p][-1]:.1f} s", flush=True)
    result = {
        "images": args.images,
        "pinned_one_core_per_rank": args.pin,
        "load_average_after": os.getloadavg(),
        "cores": os.cpu_count(),
        "seconds": times,
        "images_per_s_median": {p: round(args.images / statistics.median(t), 2) for p, t in times.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
