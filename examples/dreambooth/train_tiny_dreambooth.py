"""DreamBooth-style run on the tiny flavour: one subject folder, one instance prompt.

    python examples/dreambooth/train_tiny_dreambooth.py [hydra overrides...]

It draws a small "subject" dataset (the same star in different colours and places), then runs the
same `train()` that `python -m flux_lightning` runs, with `caption_strategy=instanceprompt`.
For a real subject swap in `+experiment=krea_lora dataset.instance_data_dir=/your/photos`.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw

from flux_lightning.run.train import config_dir, train

INSTANCE_PROMPT = "a photo of sks star"


def draw_subject(folder: Path, count: int = 8, size: int = 128, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        im = Image.new("RGB", (size, size), tuple(rng.randint(150, 255) for _ in range(3)))
        cx, cy, r = rng.uniform(40, 88), rng.uniform(40, 88), rng.uniform(22, 34)
        radius = [r if k % 2 == 0 else r / 2.5 for k in range(10)]
        angle = [k * math.pi / 5 - math.pi / 2 for k in range(10)]
        points = [(cx + radius[k] * math.cos(angle[k]), cy + radius[k] * math.sin(angle[k])) for k in range(10)]
        ImageDraw.Draw(im).polygon(points, fill=(200, 160, 20))
        im.save(folder / f"star_{i:02d}.png")
    return folder


def main(argv: list[str]) -> float:
    root = Path("outputs/examples/dreambooth").resolve()
    data = draw_subject(root / "subject")
    overrides = [
        f"dataset.instance_data_dir={data}",
        "dataset.caption_strategy=instanceprompt",
        f"dataset.instance_prompt='{INSTANCE_PROMPT}'",
        f"callbacks.validation.validation_prompt='{INSTANCE_PROMPT}'",
        f"paths.output_dir={root / 'run'}",
        f"paths.cache_dir={root / 'cache'}",
        *argv,
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
