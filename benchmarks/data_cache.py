"""Data-path benchmark: cached-batch reads vs the tiny model's training step, and warm-cache re-runs.

    python benchmarks/data_cache.py [--images 1000] [--out benchmarks/results/data_cache.json]

1. Fills the caches for N generated 64x64 images (tiny flavour), then times
   (a) a second ``prepare_data()`` + ``setup()`` over the warm cache (target: < 5 s for 1000 images),
   (b) reading cached batches (batch 4) through the DataLoader, and
   (c) one training step of the tiny flavour on such a batch (forward + backward + AdamW),
   and reports how many times faster reading is than training (target: >= 20x).
2. Times the verification every cache read does (header, names, shapes, dtypes, key, finite
   values; see ``flux_lightning.data.cache``) on entries of real FLUX.1 size: latents of a
   1024x1024 image ``(16, 128, 128)`` float32 (1 MiB) and text embeddings ``(512, 4096)`` +
   ``(768,)`` + ``(512,)`` (8 MiB), ``--real-entries`` of each, read warm (page cache) as on a re-run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from flux_lightning import AdapterConfig, DatasetConfig, FluxDataModule, FluxLoRAModule, ModelConfig
from flux_lightning.data.cache import TensorCache, cache_key, latent_spec, load_many, text_spec
from flux_lightning.data.config import ImageBackendConfig


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        Image.new("RGB", (64, 64), colour).save(folder / f"image {i:05d}.png")


def _verify_real_size(root: Path, n: int) -> dict:
    """ms per verified load of real-size latent and text entries, and the read rate in GB/s."""
    cache = TensorCache(root / "real")
    kinds = {
        "latent": (latent_spec((1024, 1024)), lambda: {"latents": torch.randn(16, 128, 128)}),
        "text": (
            text_spec(512),
            lambda: {
                "prompt_embeds": torch.randn(512, 4096),
                "pooled_prompt_embeds": torch.randn(768),
                "attention_mask": torch.ones(512, dtype=torch.uint8),
            },
        ),
    }
    out = {}
    for kind, (spec, make) in kinds.items():
        keys = [cache_key(kind=kind, i=i) for i in range(n)]
        for key in keys:
            cache.save(key, make())
        size = cache.path(keys[0]).stat().st_size
        entries = [(cache, key, spec) for key in keys]
        load_many(entries)  # warm the page cache, as a re-run finds it
        t = time.perf_counter()
        assert all(isinstance(r, dict) for r in load_many(entries))  # what prepare_data runs
        ms = (time.perf_counter() - t) / n * 1e3
        out[f"verify_{kind}_ms"] = round(ms, 3)
        out[f"verify_{kind}_gb_per_s"] = round(size / ms / 1e6, 2)
    shutil.rmtree(cache.root)
    return out


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--real-entries", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flux-data-bench-"))
    _images(root / "data", args.images)
    model = ModelConfig(flavour="tiny", cache_dir=str(root / "models"))
    cfg = DatasetConfig(
        backends=[ImageBackendConfig(id="bench", instance_data_dir=str(root / "data"), resolution=64, crop=True)],
        cache_dir=str(root / "cache"),
        batch_size=4,
        vae_batch_size=32,
    )
    t0 = time.perf_counter()
    cold = FluxDataModule(cfg, model)
    cold.prepare_data()
    cold.setup("fit")
    cold_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    warm = FluxDataModule(cfg, model)
    warm.prepare_data()
    warm.setup("fit")
    warm_s = time.perf_counter() - t0

    loader = warm.train_dataloader()
    it = iter(loader)
    next(it)
    read = []
    for _ in range(200):
        t = time.perf_counter()
        batch = next(it)
        read.append(time.perf_counter() - t)

    module = FluxLoRAModule(model, AdapterConfig(rank=16), optimizer=partial(torch.optim.AdamW, lr=1e-4))
    module.configure_model()
    opt = module.configure_optimizers()
    steps = []
    for i in range(30):
        t = time.perf_counter()
        loss = module.training_step(batch, i)
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - t)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "images": args.images,
        "cold_cache_s": round(cold_s, 2),
        "warm_cache_rerun_s": round(warm_s, 2),
        "read_batch_ms_median": round(statistics.median(read) * 1e3, 3),
        "train_step_ms_median": round(statistics.median(steps[5:]) * 1e3, 2),
    }
    result["read_vs_step_speedup"] = round(result["train_step_ms_median"] / result["read_batch_ms_median"], 1)
    result.update(_verify_real_size(root, args.real_entries))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
