"""Image and mask loading, resize and crop to a :class:`~flux_lightning.data.buckets.Placement`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .buckets import Placement

_EXIF_ORIENTATION = 0x0112


def upright_size(path: Path) -> tuple[int, int]:
    """Image size after EXIF rotation, read from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def _normalise_mode(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    return im


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, applying EXIF rotation; transparency is composited on white;
    16-bit, grayscale, palette and CMYK images are converted."""
    with Image.open(path) as im:
        im = _normalise_mode(ImageOps.exif_transpose(im))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im.convert("RGB")


def _place(image: Image.Image, placement: Placement, resample) -> Image.Image:
    if placement.downsample:
        image = image.resize(placement.downsample, resample)
    return image.resize(placement.resize, resample).crop(placement.box)


def to_pixels(image: Image.Image, placement: Placement) -> torch.Tensor:
    """Resize and crop to the bucket; ``(3, H, W)`` in ``[-1, 1]``."""
    arr = np.asarray(_place(image, placement, Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_mask(path: Path, image_size: tuple[int, int], placement: Placement, factor: int = 8) -> torch.Tensor:
    """A loss mask at latent size ``(1, H/factor, W/factor)`` in [0, 1]: white = train, black = ignore.

    The mask gets the same geometry as its image (scaled to the image's size first), then each
    latent cell takes the mean of its ``factor x factor`` pixels.
    """
    with Image.open(path) as im:
        im = _normalise_mode(ImageOps.exif_transpose(im)).convert("L").resize(image_size, Image.Resampling.BILINEAR)
    arr = np.asarray(_place(im, placement, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return F.avg_pool2d(torch.from_numpy(arr)[None, None], factor)[0]
