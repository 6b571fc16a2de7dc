"""Find images in local folders and give each its caption."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .config import DatasetConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class DataError(ValueError):
    """The dataset cannot be used; the message names the folder/field and the fix."""


@dataclass(frozen=True)
class ImageRecord:
    """One training image and its caption."""

    path: Path
    caption: str


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, symlinked folders not followed), sorted."""
    root = Path(os.path.expanduser(folder))
    if not root.is_dir():
        raise DataError(
            f"dataset.instance_data_dir: folder '{folder}' does not exist; "
            "point it at a folder of images"
        )
    found = []
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return sorted(found)


def caption_for(path: Path, cfg: DatasetConfig) -> str | None:
    """The caption of ``path`` under ``cfg.caption_strategy``; None when it has none (skip it)."""
    if cfg.caption_strategy == "instanceprompt":
        return cfg.instance_prompt
    if cfg.caption_strategy == "filename":
        return " ".join(path.stem.replace("_", " ").split())
    text_file = path.with_suffix(".txt")
    if not text_file.is_file():
        log.warning("skipping %s: caption_strategy=textfile but %s is missing", path, text_file.name)
        return None
    return text_file.read_text(encoding="utf-8", errors="replace").strip()


def discover(cfg: DatasetConfig, folders: list[str]) -> tuple[list[ImageRecord], int]:
    """Records for every captioned image in ``folders`` and the number of images skipped."""
    records, skipped = [], 0
    for folder in folders:
        images = find_images(folder)
        if not images:
            raise DataError(
                f"dataset.instance_data_dir: folder '{folder}' holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or fix the path"
            )
        for path in images:
            caption = caption_for(path, cfg)
            if caption is None:
                skipped += 1
            else:
                records.append(ImageRecord(path, caption))
    return records, skipped
