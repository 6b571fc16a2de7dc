"""A generated demo dataset: coloured shapes on plain backgrounds, captioned by file name."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..atomic_files import build_folder_once

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, colour, background, size: int, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = size * rng.uniform(0.38, 0.62), size * rng.uniform(0.38, 0.62)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def make_demo_dataset(root: str | os.PathLike, count: int = 16, size: int = 128, seed: int = 0) -> Path:
    """Write ``count`` PNGs named like ``a red circle on a white background.png`` (once; atomic)."""
    folder = Path(os.path.expanduser(root)) / f"shapes-v1-n{count}-s{size}-seed{seed}"

    def draw_all(tmp: Path) -> None:
        rng = random.Random(seed)
        combos = [
            (s, c, b)
            for s, c, b in itertools.product(SHAPES, COLOURS, BACKGROUNDS)
            if not (c == "yellow" and b == "white")
        ]
        rng.shuffle(combos)
        for shape, colour, bg in combos[:count]:
            im = _draw(shape, COLOURS[colour], BACKGROUNDS[bg], size, rng)
            im.save(tmp / f"a {colour} {shape} on a {bg} background.png")

    return build_folder_once(folder, draw_all)
