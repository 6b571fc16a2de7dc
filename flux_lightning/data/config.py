"""Typed dataset configuration (``dataset=`` group)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt")
CROP_STYLES = ("center", "random")


@dataclass
class DatasetConfig:
    """One or more local image folders, captioned and cropped the same way.

    Attributes:
        instance_data_dir: a folder or a list of folders (searched recursively); null = generate the
            demo dataset (coloured shapes, captions in the file names) under ``cache_dir``.
        caption_strategy: ``filename`` (the file name, ``_`` read as a space), ``textfile`` (a
            ``.txt`` beside each image) or ``instanceprompt`` (``instance_prompt`` for every image).
        instance_prompt: the trigger/instance prompt (required by ``instanceprompt``).
        resolution: square training side in pixels (multiple of 16); images are resized so their
            shorter side matches, then cropped.
        crop_style: ``center`` or ``random`` (a random box drawn once per image and cached).
        caption_dropout_probability: chance that a sample trains on the empty caption instead.
        batch_size: images per training step.
        num_workers: dataloader workers; null = sized automatically (see
            :func:`flux_lightning.data.datamodule.default_num_workers`).
        vae_batch_size: images per VAE encode call while caching.
        write_batch_size: captions per text-encoder call while caching.
        cache_dir: root of the shared caches (``vae/``, ``text/``, ``demo/``); keep it outside run
            dirs so runs and sweep jobs share it.
        demo_images: number of generated images when ``instance_data_dir`` is null.
        seed: seed for random crops, sampling order and caption dropout.
    """

    instance_data_dir: Any = None
    caption_strategy: str = "filename"
    instance_prompt: str | None = None
    resolution: int = 1024
    crop_style: str = "center"
    caption_dropout_probability: float = 0.1
    batch_size: int = 1
    num_workers: int | None = None
    vae_batch_size: int = 4
    write_batch_size: int = 16
    cache_dir: str = "~/.cache/flux_lightning"
    demo_images: int = 16
    seed: int = 0

    def folders(self) -> list[str]:
        dirs = self.instance_data_dir
        if dirs is None:
            return []
        return [str(dirs)] if isinstance(dirs, str) else [str(d) for d in dirs]

    def problems(self) -> list[str]:
        """Every invalid field, each as one line naming the field and the fix."""
        out = []
        if self.caption_strategy not in CAPTION_STRATEGIES:
            out.append(
                f"dataset.caption_strategy={self.caption_strategy!r} is unknown; "
                f"use one of {', '.join(CAPTION_STRATEGIES)}"
            )
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            out.append("dataset.caption_strategy=instanceprompt needs dataset.instance_prompt=<text>")
        if self.resolution <= 0 or self.resolution % 16:
            out.append(
                f"dataset.resolution={self.resolution} must be a positive multiple of 16 "
                "(latents are 1/8 of the image and are packed in 2x2 patches)"
            )
        if self.crop_style not in CROP_STYLES:
            out.append(f"dataset.crop_style={self.crop_style!r} is unknown; use center or random")
        if not 0.0 <= self.caption_dropout_probability <= 1.0:
            out.append("dataset.caption_dropout_probability must be within [0, 1]")
        if self.num_workers is not None and self.num_workers < 0:
            out.append(f"dataset.num_workers={self.num_workers} must be >= 0 (or null = automatic)")
        for name in ("batch_size", "vae_batch_size", "write_batch_size"):
            if getattr(self, name) < 1:
                out.append(f"dataset.{name} must be >= 1")
        return out
