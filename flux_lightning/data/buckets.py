"""Aspect buckets: which (width, height) an image trains at, and how it is resized and cropped there."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from .config import ImageBackendConfig

MEGAPIXEL = 1024 * 1024  # resolution_type=area: 1.0 means a 1024x1024 area
STEP = 64  # bucket sides are multiples of 64 (square crops keep the exact resolution)


@dataclass(frozen=True)
class Placement:
    """Where an image lands: its bucket and the resize/crop that produces it.

    Attributes:
        bucket: ``(width, height)`` in pixels of the training image.
        resize: ``(width, height)`` the image is resized to before cropping (covers the bucket).
        box: ``(left, top, right, bottom)`` crop in the resized image, the bucket's size.
        downsample: ``(width, height)`` of a first downsampling step (``maximum_image_size``), or None.
    """

    bucket: tuple[int, int]
    resize: tuple[int, int]
    box: tuple[int, int, int, int]
    downsample: tuple[int, int] | None = None


def size_metric(size: tuple[int, int], resolution_type: str) -> float:
    """An image's size in the unit of ``resolution`` for its ``resolution_type``."""
    w, h = size
    if resolution_type == "pixel":
        return min(w, h)
    if resolution_type == "area":
        return w * h / MEGAPIXEL
    return math.sqrt(w * h)


def _round(x: float, step: int = STEP) -> int:
    return max(step, int(round(x / step)) * step)


def _rng(key: str, seed: int, salt: str) -> random.Random:
    return random.Random(hashlib.sha256(f"{seed}:{salt}:{key}".encode()).hexdigest())


def bucket_aspect(size: tuple[int, int], cfg: ImageBackendConfig, *, key: str, seed: int) -> float:
    """The width/height ratio the image trains at, following ``crop``/``crop_aspect``."""
    w, h = size
    aspect = w / h
    if not cfg.crop or cfg.crop_aspect == "preserve":
        return aspect
    if cfg.crop_aspect == "square":
        return 1.0
    choices = [float(a) for a in cfg.crop_aspect_buckets or [1.0]]
    if cfg.crop_aspect == "closest":
        return min(choices, key=lambda a: abs(math.log(a / aspect)))
    return _rng(key, seed, "aspect").choice(choices)


def bucket_size(aspect: float, cfg: ImageBackendConfig) -> tuple[int, int]:
    """``(width, height)`` with sides multiples of 64 (area ~ resolution^2 for pixel_area/area;
    shorter side = resolution for pixel); a square crop keeps ``resolution`` exactly."""
    r = cfg.resolution
    if aspect == 1.0 and cfg.crop and cfg.crop_aspect == "square":
        side = int(r) if cfg.resolution_type != "area" else _round(math.sqrt(r * MEGAPIXEL), 16)
        return side, side
    if cfg.resolution_type == "pixel":
        return (_round(r * aspect), _round(r)) if aspect >= 1 else (_round(r), _round(r / aspect))
    area = r * r if cfg.resolution_type == "pixel_area" else r * MEGAPIXEL
    return _round(math.sqrt(area * aspect)), _round(math.sqrt(area / aspect))


def place(size: tuple[int, int], cfg: ImageBackendConfig, *, key: str, seed: int = 0) -> Placement:
    """Bucket, optional downsample, cover-resize and crop box for an upright image of ``size``."""
    w, h = size
    downsample = None
    if cfg.maximum_image_size and size_metric(size, cfg.resolution_type) > cfg.maximum_image_size:
        target = cfg.target_downsample_size or cfg.maximum_image_size
        factor = target / size_metric(size, cfg.resolution_type)
        if cfg.resolution_type == "area":
            factor = math.sqrt(factor)
        downsample = (max(1, round(w * factor)), max(1, round(h * factor)))
        w, h = downsample
    bucket = bucket_size(bucket_aspect((w, h), cfg, key=key, seed=seed), cfg)
    return fit((w, h), bucket, cfg.crop_style, key=key, seed=seed, downsample=downsample)


def fit(
    size: tuple[int, int],
    bucket: tuple[int, int],
    crop_style: str = "center",
    *,
    key: str = "",
    seed: int = 0,
    downsample: tuple[int, int] | None = None,
) -> Placement:
    """Cover-resize an image of ``size`` to ``bucket`` and crop it there (``center``/``random``/``corner``)."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, math.ceil(w * scale - 1e-6)), max(bh, math.ceil(h * scale - 1e-6))
    if crop_style == "corner":
        left, top = 0, 0
    elif crop_style == "random":
        rng = _rng(key, seed, "crop")
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    return Placement((bw, bh), (rw, rh), (left, top, left + bw, top + bh), downsample)
