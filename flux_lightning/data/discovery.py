"""Find images in a backend's folders and give each its caption."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ImageBackendConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class DataError(ValueError):
    """The dataset cannot be used; the message names the folder/field and the fix."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a backend: its file, its path relative to the backend folder and its caption."""

    path: Path
    relative: str
    caption: str


def find_images(folder: str | os.PathLike, field: str = "dataset.instance_data_dir") -> list[Path]:
    """Image files under ``folder`` (recursive; symlinked folders are not followed), sorted."""
    root = Path(os.path.expanduser(folder))
    if not root.is_dir():
        raise DataError(f"{field}: folder '{folder}' does not exist; point it at a folder of images")
    found = []
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _metadata_captions(folder: Path, cfg: ImageBackendConfig) -> dict[str, str]:
    """file name (relative to the folder) -> caption, from a parquet or csv table."""
    path = Path(cfg.metadata_file).expanduser() if cfg.metadata_file else folder / f"metadata.{cfg.caption_strategy}"
    field = f"dataset.backends[{cfg.id}].metadata_file"
    if not path.is_file():
        raise DataError(f"{field}: {path} does not exist; point metadata_file at the {cfg.caption_strategy} table")
    col_f, col_c = cfg.metadata_filename_column, cfg.metadata_caption_column
    if cfg.caption_strategy == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        header = set(rows[0]) if rows else set()
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{field}: reading parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        header = set(table.column_names)
        rows = table.to_pylist()
    missing = {col_f, col_c} - header
    if rows and missing:
        raise DataError(f"{field}: {path.name} has no column(s) {sorted(missing)}; set metadata_filename_column / metadata_caption_column")
    return {str(r[col_f]): "" if r[col_c] is None else str(r[col_c]) for r in rows}


def _caption(path: Path, relative: str, cfg: ImageBackendConfig, table: dict[str, str] | None) -> str | None:
    if cfg.caption_strategy == "instanceprompt":
        return cfg.instance_prompt
    if cfg.caption_strategy == "filename":
        return " ".join(path.stem.replace("_", " ").split())
    if table is not None:
        caption = table.get(relative, table.get(path.name))
        if caption is None:
            log.warning("skipping %s: no row for it in the %s metadata table", path, cfg.caption_strategy)
        return caption
    text_file = path.with_suffix(".txt")
    if not text_file.is_file():
        log.warning("skipping %s: caption_strategy=textfile but %s is missing", path, text_file.name)
        return None
    return text_file.read_text(encoding="utf-8", errors="replace").strip()


def discover(cfg: ImageBackendConfig, folders: list[str] | None = None) -> tuple[list[ImageRecord], int]:
    """Captioned images of one backend and the number skipped (each skip is logged with its reason)."""
    records, skipped = [], 0
    field = "dataset.instance_data_dir" if cfg.id in ("default", "demo") else f"dataset.backends[{cfg.id}].instance_data_dir"
    for folder in folders if folders is not None else cfg.folders():
        root = Path(folder).expanduser()
        images = find_images(folder, field)
        if not images:
            raise DataError(
                f"{field}: folder '{folder}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or fix the path"
            )
        table = _metadata_captions(root, cfg) if cfg.caption_strategy in ("parquet", "csv") else None
        for path in images:
            relative = path.relative_to(root).as_posix()
            caption = _caption(path, relative, cfg, table)
            if caption is not None and not caption.strip() and cfg.dataset_type == "image":
                log.warning(
                    "skipping %s: empty caption (write one; for unconditional training use "
                    "caption_dropout_probability)", path,
                )
                caption = None
            if caption is None:
                skipped += 1
            else:
                records.append(ImageRecord(path, relative, caption))
    return records, skipped
