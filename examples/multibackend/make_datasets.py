"""Draw small stand-ins for the quickstart's two folders, with mixed aspect ratios.

    python examples/multibackend/make_datasets.py [root]      # default root: the current directory
    python -m flux_lightning +experiment=dreambooth_reg_tiny  # then train on them (tiny flavour)

``datasets/pseudo-camera-10k`` gets "camera photos" (captions in file names) at and above 512 px;
``datasets/dreambooth-subject`` gets a subject (a yellow star) at 1024-class sizes.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

REG_SIZES = [(768, 512), (512, 768), (640, 640), (896, 512), (512, 512), (600, 800)]
SUBJECT_SIZES = [(1280, 1024), (1024, 1280), (1152, 1152)]
SCENES = ["a red house", "a green field", "a blue lake", "an orange sunset", "a gray street", "a purple flower"]


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    pts = []
    for k in range(10):
        radius = r if k % 2 == 0 else r / 2.5
        angle = k * math.pi / 5 - math.pi / 2
        pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    draw.polygon(pts, fill=fill)


def make(root: Path, seed: int = 0, reg: int = 6, subject: int = 3) -> tuple[Path, Path]:
    rng = random.Random(seed)
    reg_dir, subj_dir = root / "datasets" / "pseudo-camera-10k", root / "datasets" / "dreambooth-subject"
    reg_dir.mkdir(parents=True, exist_ok=True)
    subj_dir.mkdir(parents=True, exist_ok=True)
    for i in range(reg):
        w, h = REG_SIZES[i % len(REG_SIZES)]
        im = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
        d = ImageDraw.Draw(im)
        d.rectangle((w * 0.2, h * 0.4, w * 0.8, h * 0.9), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        im.save(reg_dir / f"{SCENES[i % len(SCENES)]} {i}.jpg", quality=90)
    for i in range(subject):
        w, h = SUBJECT_SIZES[i % len(SUBJECT_SIZES)]
        im = Image.new("RGB", (w, h), tuple(rng.randint(150, 255) for _ in range(3)))
        _star(ImageDraw.Draw(im), w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6), min(w, h) * 0.3, (220, 180, 20))
        im.save(subj_dir / f"star_{i}.png")
    return reg_dir, subj_dir


if __name__ == "__main__":
    for folder in make(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(folder)
