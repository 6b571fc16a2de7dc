"""Image and mask loading, resize and crop to a :class:`~flux_lightning.data.buckets.Placement`.

An image is a file path, or any object with ``open()`` returning a binary file (a row of a
Hugging Face dataset: :class:`~flux_lightning.data.huggingface.RowImage`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .buckets import Placement

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(src) -> Image.Image:
    """``Image.open`` of a path, or of ``src.open()`` for an image that is not a file. Pillow's own
    decompression-bomb limit is off here: ``dataset.max_image_pixels`` is checked from the header first
    (:meth:`~flux_lightning.data.resolve.SampleResolver.size_problem`), with a message naming it."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(src if isinstance(src, (str, os.PathLike)) else src.open())
    finally:
        Image.MAX_IMAGE_PIXELS = previous


_PNG_EXIF_DECODE_LIMIT = 16_000_000  # px: above, a PNG's orientation is read from its header chunks only


def upright_size(path: Path) -> tuple[int, int]:
    """Image size after EXIF rotation, read from the header only. Pillow's ``getexif()`` decodes a
    whole PNG to find an eXIf chunk after the pixels: a huge PNG would be decoded (or called
    truncated) before its size is checked, so a large PNG's orientation comes from the chunks
    before its pixels (where writers put it)."""
    with open_image(path) as im:
        w, h = im.size
        if im.format == "PNG" and ("exif" in im.info or w * h > _PNG_EXIF_DECODE_LIMIT):
            exif = Image.Exif()
            if "exif" in im.info:
                exif.load(im.info["exif"])
        else:
            exif = im.getexif()
        if exif.get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT = 258, 339


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _white(im: Image.Image) -> float | None:
    """The value that means white in a deep image, or None for 8-bit modes.

    ``I;16*`` modes hold 16 bits. Pillow opens other deep integer formats (16-bit PGM/PPM, older
    16-bit PNG) as ``I`` with 16-bit values, except TIFF, whose ``BitsPerSample`` tag gives the
    depth (``SampleFormat`` 2 = signed: white is ``2**(bits-1) - 1``). Float (``F``) images are
    taken as ``[0, 1]``.
    """
    if im.mode.startswith("I;16"):
        return 65535.0
    if im.mode == "F":
        return 1.0
    if im.mode != "I":
        return None
    tags = getattr(im, "tag_v2", None) or {}
    bits = int(_first(tags.get(_TIFF_BITS_PER_SAMPLE)) or 16)
    signed = _first(tags.get(_TIFF_SAMPLE_FORMAT)) == 2
    return float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)


def _open_8bit(path: Path) -> Image.Image:
    """The image upright (EXIF rotation applied), deep images scaled to 8-bit ``L``:
    ``round(v * 255 / white)`` clipped to ``[0, 255]`` (white from :func:`_white`)."""
    with open_image(path) as im:
        white = _white(im)  # before the transpose, which drops the TIFF tags
        im = ImageOps.exif_transpose(im)
        if white is not None:
            arr = np.asarray(im, dtype=np.float64)
            return Image.fromarray(np.clip(np.rint(arr * (255.0 / white)), 0, 255).astype(np.uint8))
        im.load()
        return im


def load_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB, applying EXIF rotation.

    Transparency (RGBA, LA, PA, palette with a transparent index) is composited on white; 16-bit,
    32-bit integer and float grayscale are scaled by their bit depth (see :func:`_white`);
    grayscale, palette and CMYK are converted. Animated files (GIF, WebP) give their first frame.
    """
    im = _open_8bit(path)
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)


def _alpha(im: Image.Image) -> Image.Image:
    """The alpha channel as ``L`` (255 = opaque); an image without transparency is opaque everywhere."""
    if _has_alpha(im):
        return im.convert("RGBA").getchannel("A")
    return Image.new("L", im.size, 255)


def _place(image: Image.Image, placement: Placement, resample) -> Image.Image:
    if placement.downsample:
        image = image.resize(placement.downsample, resample)
    return image.resize(placement.resize, resample).crop(placement.box)


def to_pixels(image: Image.Image, placement: Placement) -> torch.Tensor:
    """Resize and crop to the bucket; ``(3, H, W)`` in ``[-1, 1]``."""
    arr = np.asarray(_place(image, placement, Image.Resampling.LANCZOS), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_mask(
    path: Path, image_size: tuple[int, int], placement: Placement, factor: int = 8, *, alpha: bool = False
) -> torch.Tensor:
    """A loss mask at latent size ``(1, H/factor, W/factor)`` in [0, 1]: white = train, black = ignore.

    The mask gets the same geometry as its image (scaled to the image's size first), then each
    latent cell takes the mean of its ``factor x factor`` pixels. ``alpha``: ``path`` is the
    training image itself and its alpha channel is the mask (opaque = train), placed the same way.
    """
    im = _open_8bit(path)
    im = (_alpha(im) if alpha else im.convert("L")).resize(image_size, Image.Resampling.BILINEAR)
    arr = np.asarray(_place(im, placement, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return F.avg_pool2d(torch.from_numpy(arr)[None, None], factor)[0]
