"""Find images in a backend's folders and give each its caption."""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import features

from ..errors import DataError
from .config import ImageBackendConfig

log = logging.getLogger(__name__)

#: set on the log record of every skip (``extra``), so a log handler can tell skips from other warnings
SKIP_RECORD = "flux_lightning_skip"


class Skip(NamedTuple):
    """An image training does not use, and why: what discovery returns (and logs as
    ``skipping <file>: <reason>``) for each image it leaves out."""

    path: Any  # a Path, or a huggingface.RowImage
    reason: str


def skip(skips: list[Skip], path, reason: str) -> None:
    """Record (and log, one warning) that ``path`` is skipped for ``reason``."""
    log.warning("skipping %s: %s", path, reason, extra={SKIP_RECORD: True})
    skips.append(Skip(path, reason))


# Formats read with Pillow (animated GIF/WebP/APNG: the first frame; multi-page TIFF: the first page).
IMAGE_EXTENSIONS = {
    ".png",
    ".apng",
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".webp",
    ".bmp",
    ".dib",
    ".gif",
    ".tif",
    ".tiff",
    ".pbm",
    ".pgm",
    ".ppm",
    ".pnm",
    ".tga",
} | ({".avif"} if features.check("avif") else set())
# Image formats that are not read: skipped and counted like unreadable images.
UNSUPPORTED_IMAGE_EXTENSIONS = {
    ".avif",
    ".heic",
    ".heif",
    ".jxl",
    ".jp2",
    ".j2k",
    ".svg",
    ".psd",
    ".xcf",
    ".kra",
    ".ico",
    ".icns",
    ".exr",
    ".hdr",
    ".dng",
    ".raw",
    ".cr2",
    ".cr3",
    ".nef",
    ".arw",
    ".orf",
    ".rw2",
    ".raf",
} - IMAGE_EXTENSIONS
# Files a dataset folder may hold besides images: captions, metadata tables, SimpleTuner's indexes.
DATASET_FILE_EXTENSIONS = {".txt", ".caption", ".csv", ".parquet", ".json", ".jsonl"}
CAPTION_EXTENSIONS = (".txt", ".caption")  # caption_strategy=textfile: <image stem>.txt, else .caption


@dataclass(frozen=True)
class ImageRecord:
    """One image of a backend: its file, its path relative to the backend folder, its caption and
    the position of that folder in the backend's list. For a ``type: huggingface`` backend,
    ``path`` is a :class:`~flux_lightning.data.huggingface.RowImage`, ``relative`` the row index
    and ``mask`` the row's mask image (``mask_column``), if any."""

    path: Path
    relative: str
    caption: str
    folder: int = 0
    mask: Any = None


@dataclass
class FolderScan:
    """What a data folder holds: images to use, image files skipped and other files not used.

    Attributes:
        images: readable-format image files, sorted.
        skipped: ``(file, reason)`` of image files that are not used (hidden, unsupported format).
        ignored: ``(file, reason)`` of other files that are neither images nor dataset files
            (captions, metadata tables), and of symlinked folders that are not followed.
    """

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)


def scan_folder(folder: str | os.PathLike, field_name: str = "dataset.instance_data_dir") -> FolderScan:
    """Every file under ``folder`` (recursive), sorted into images, skipped images and other files.

    Symlinked folders are followed, once: a link to a folder already searched (a loop, or a second
    way to the same folder) is reported in ``ignored``. Hidden files (``.name``) are not used.
    """
    root = Path(os.path.expanduser(folder))
    if not root.is_dir():
        raise DataError(f"{field_name}: folder '{folder}' does not exist; point it at a folder of images")
    scan = FolderScan()
    seen = {os.path.realpath(root): root}
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in list(dirs):
            sub = Path(dirpath) / name
            real = os.path.realpath(sub)
            if real in seen:
                dirs.remove(name)
                why = f"symlinked folder leads to {seen[real]}, already searched (loop); not followed"
                scan.ignored.append((sub, why))
            elif name.startswith("."):
                dirs.remove(name)
                scan.ignored.append((sub, "hidden folder"))
            else:
                seen[real] = sub
        stems = {Path(n).stem for n in files if Path(n).suffix.lower() in IMAGE_EXTENSIONS}
        for name in sorted(files):
            path, ext = Path(dirpath) / name, Path(name).suffix.lower()
            image = ext in IMAGE_EXTENSIONS or ext in UNSUPPORTED_IMAGE_EXTENSIONS
            if name.startswith("."):
                (scan.skipped if image else scan.ignored).append((path, "hidden file"))
            elif ext in IMAGE_EXTENSIONS:
                scan.images.append(path)
            elif image:
                scan.skipped.append((path, f"unsupported image format {ext}; convert it to PNG or JPEG"))
            elif ext in CAPTION_EXTENSIONS and Path(name).stem not in stems:
                scan.ignored.append((path, "caption file without an image of the same name"))
            elif ext not in DATASET_FILE_EXTENSIONS:
                scan.ignored.append((path, "not an image format this trainer reads"))
    scan.images.sort()
    return scan


def report_scan(scan: FolderScan, folder: str | os.PathLike, what: str) -> None:
    """Log each skipped image (one line each) and the other unused files (one line per folder)."""
    for path, reason in scan.skipped:
        log.warning("skipping %s: %s", path, reason, extra={SKIP_RECORD: True})
    if scan.ignored:
        root = os.path.expanduser(folder)
        shown = ", ".join(f"{os.path.relpath(p, root)} ({why})" for p, why in scan.ignored[:10])
        more = f" and {len(scan.ignored) - 10} more" if len(scan.ignored) > 10 else ""
        log.warning("%s: %d file(s) in %s not used: %s%s", what, len(scan.ignored), folder, shown, more)


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_text(path: Path) -> str:
    """A caption or metadata file as text: UTF-8 (a UTF-8 or UTF-16 byte-order mark is honoured).

    A file that is not valid UTF-8 is read as Windows-1252 (the usual legacy encoding; Latin-1
    for its 5 unassigned bytes) with a warning naming the file, since its non-ASCII characters may
    be wrong.
    """
    data = path.read_bytes()
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        try:
            text, encoding = data.decode("cp1252"), "Windows-1252"
        except UnicodeDecodeError:
            text, encoding = data.decode("latin-1"), "Latin-1"
        log.warning(
            "%s is not UTF-8 (byte 0x%02x at %d); read as %s: %r. Save it as UTF-8 if that is wrong",
            path,
            data[err.start],
            err.start,
            encoding,
            text[max(0, err.start - 20) : err.start + 20],
        )
        return text


def find_images(folder: str | os.PathLike, field: str = "dataset.instance_data_dir") -> list[Path]:
    """Image files under ``folder`` in the formats this trainer reads (see :func:`scan_folder`), sorted."""
    return scan_folder(folder, field).images


def _metadata_captions(folder: Path, cfg: ImageBackendConfig) -> dict[str, str]:
    """file name (relative to the folder) -> caption, from a parquet or csv table."""
    path = Path(cfg.metadata_file).expanduser() if cfg.metadata_file else folder / f"metadata.{cfg.caption_strategy}"
    field = f"dataset.backends[{cfg.id}].metadata_file"
    if not path.is_file():
        raise DataError(f"{field}: {path} does not exist; point metadata_file at the {cfg.caption_strategy} table")
    col_f, col_c = cfg.metadata_filename_column, cfg.metadata_caption_column
    if cfg.caption_strategy == "csv":
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
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
        raise DataError(
            f"{field}: {path.name} has no column(s) {sorted(missing)}; set metadata_filename_column / metadata_caption_column"
        )
    return {str(r[col_f]): "" if r[col_c] is None else str(r[col_c]) for r in rows}


def _caption(
    path: Path, relative: str, cfg: ImageBackendConfig, table: dict[str, str] | None
) -> tuple[str | None, str]:
    """The image's caption, or None and why it has none."""
    if cfg.caption_strategy == "instanceprompt":
        return cfg.instance_prompt, "no instance_prompt"
    if cfg.caption_strategy == "filename":
        return " ".join(path.stem.replace("_", " ").split()), ""
    if table is not None:
        caption = table.get(relative, table.get(path.name))
        return caption, f"no row for it in the {cfg.caption_strategy} metadata table"
    text_file = next((path.with_suffix(e) for e in CAPTION_EXTENSIONS if path.with_suffix(e).is_file()), None)
    if text_file is None:
        return (
            None,
            f"caption_strategy=textfile but {path.with_suffix('.txt').name} is missing (a .caption file would do too)",
        )
    return read_text(text_file).strip(), ""


def discover(cfg: ImageBackendConfig, folders: list[str] | None = None) -> tuple[list[ImageRecord], list[Skip]]:
    """Captioned images of one backend and the images skipped, with the reason (each also logged)."""
    records, skips = [], []
    field = (
        "dataset.instance_data_dir"
        if cfg.id in ("default", "demo")
        else f"dataset.backends[{cfg.id}].instance_data_dir"
    )
    for index, folder in enumerate(folders if folders is not None else cfg.folders()):
        root = Path(folder).expanduser()
        scan = scan_folder(folder, field)
        report_scan(scan, folder, f"backend {cfg.id!r}")
        skips += [Skip(p, why) for p, why in scan.skipped]
        images = scan.images
        if not images:
            raise DataError(
                f"{field}: folder '{folder}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or fix the path"
            )
        table = _metadata_captions(root, cfg) if cfg.caption_strategy in ("parquet", "csv") else None
        for path in images:
            relative = path.relative_to(root).as_posix()
            caption, why = _caption(path, relative, cfg, table)
            if caption is not None and not caption.strip() and cfg.dataset_type == "image":
                caption, why = (
                    None,
                    "empty caption (write one; for unconditional training use caption_dropout_probability)",
                )
            if caption is None:
                skip(skips, path, why)
            else:
                records.append(ImageRecord(path, relative, caption, index))
    return records, skips
