"""Image loading, resize and crop to the training resolution."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, applying EXIF rotation; transparency is composited on white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if im.mode == "I;16" or im.mode.startswith("I"):
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
        return im.convert("RGB")


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """``(w, h)`` after scaling the shorter side to ``resolution``."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def crop_box(
    size: tuple[int, int], resolution: int, style: str, *, key: str = "", seed: int = 0
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the square crop in the resized image.

    ``random`` draws the box from ``(seed, key)`` so the same file always gets the same crop and
    the box can be part of the cache key.
    """
    w, h = resized_size(size, resolution)
    if style == "center":
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        rng = random.Random(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest())
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    return left, top, left + resolution, top + resolution


def to_pixels(image: Image.Image, resolution: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Resize, crop to ``box`` and scale to ``[-1, 1]``: a ``(3, resolution, resolution)`` tensor."""
    image = image.resize(resized_size(image.size, resolution), Image.Resampling.LANCZOS).crop(box)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
