"""Backends of ``type: huggingface``: images and captions from the rows of a *local* Hugging Face
``datasets`` dataset (a folder written by ``save_to_disk``, or parquet files). Nothing is ever
downloaded: a hub id is refused with the command that saves it locally.

Each row becomes an :class:`~flux_lightning.data.discovery.ImageRecord` whose ``path`` is a
:class:`RowImage` (the image bytes of that row, opened on demand) and whose ``relative`` name is the
row index, so the rest of the pipeline -- size checks from the header, buckets, content-addressed
cache keys (from the image bytes), masks, skip reports -- is the one local folders use.
The ``datasets`` library is imported here only, when such a backend is read.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, Problem
from .config import ImageBackendConfig, backend_field
from .discovery import ImageRecord, Skip, skip

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "flux-lightning[huggingface]"'
_SAVED_MARKERS = ("state.json", "dataset_dict.json")  # Dataset / DatasetDict.save_to_disk
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class RowImage:
    """The image in ``column`` of row ``index`` of a loaded dataset; it stands where a file path
    stands elsewhere: ``open()`` gives its bytes as a binary file, ``str()`` names it in messages.

    The cell may hold an ``Image`` feature (``{"bytes", "path"}``), encoded bytes, or a file path
    (relative to ``root``, the dataset's folder).
    """

    dataset: str
    index: int
    column: str
    rows: Any = field(compare=False, repr=False)
    root: Path | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"row-{self.index}-{self.column}"

    def __str__(self) -> str:
        return f"{self.dataset} row {self.index} (column {self.column!r})"

    def read_bytes(self) -> bytes:
        value = self.rows[self.index][self.column]
        data, path = None, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            path = value
        elif value is not None:
            raise ValueError(
                f"a {type(value).__name__} is not an image (encoded bytes, an Image feature or a file path)"
            )
        if data:
            return data
        if path:
            file = Path(path).expanduser()
            if not file.is_absolute() and self.root is not None:
                file = self.root / file
            return file.read_bytes()
        raise ValueError("the row holds no image")

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read_bytes())


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(f"type: huggingface backends are read with the `datasets` library: {INSTALL_HINT}") from None
    return datasets


def _saved(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS)


def parquet_files(name: str) -> list[Path]:
    """The parquet files ``dataset_name`` names: a file, a folder (recursive) or a glob."""
    path = Path(name).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.rglob("*.parquet"))
    return sorted(
        Path(p)
        for p in glob.glob(os.path.expanduser(name), recursive=True)
        if p.endswith(".parquet") and Path(p).is_file()
    )


def source_problem(backend: ImageBackendConfig) -> Problem | None:
    """Why ``backend.dataset_name`` cannot be read, or None; looks at the file system only (a saved
    folder's ``state.json``, each parquet file's footer: an empty, zero-byte, truncated or non-parquet
    file is named here, before anything loads)."""
    name = backend.dataset_name
    if not name:
        return None  # ImageBackendConfig.problems() reports it
    key = backend_field(backend.id, "dataset_name")
    path = Path(name).expanduser()
    if _saved(path) or parquet_files(name):
        if importlib.util.find_spec("datasets") is None:
            return Problem(key, f"{key}: reading '{name}' needs the `datasets` library: {INSTALL_HINT}")
        if _saved(path):
            if _saved_empty(path):
                return Problem(
                    key, f"{key}: {name} holds no rows (it was saved empty); point it at a dataset with images"
                )
            return None
        try:
            total = sum(_parquet_rows(key, f) for f in parquet_files(name))
        except DataError as err:
            return Problem(key, str(err))
        if not total:
            return Problem(
                key, f"{key}: {name} holds no rows (its parquet files are empty); point it at a dataset with images"
            )
        return None
    if path.is_dir():
        return Problem(
            key,
            f"{key}: folder '{name}' holds neither a dataset saved with save_to_disk ({' or '.join(_SAVED_MARKERS)}) "
            "nor parquet files; point it at one",
        )
    if _HUB_ID.fullmatch(name) and not name.startswith((".", "~")):
        return Problem(
            key,
            f"{key}: '{name}' is not a local folder or parquet file, and hub datasets are never downloaded "
            f"by this trainer; save it once (datasets.load_dataset('{name}', split='train').save_to_disk('<folder>')) "
            "and point dataset_name at <folder>",
        )
    return Problem(
        key, f"{key}: '{name}' is no saved dataset folder, parquet file or glob of parquet files; fix the path"
    )


def load_rows(backend: ImageBackendConfig, cache_dir: Path):
    """The backend's dataset (a ``datasets.Dataset``) with its image columns left encoded.

    Parquet files are converted once into ``datasets``' memory-mapped Arrow cache under ``cache_dir``.
    """
    problem = source_problem(backend)
    if problem:
        raise DataError(problem)
    lib = _datasets()
    path = Path(backend.dataset_name).expanduser()
    key = backend_field(backend.id, "dataset_name")
    if _saved(path):
        try:
            rows = lib.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 -- the library's errors on a damaged folder are of many kinds
            if _saved_empty(path):
                raise DataError(
                    f"{key}: {backend.dataset_name} holds no rows (it was saved empty); point it at a dataset with images"
                ) from None
            raise DataError(
                f"{key}: the saved dataset {backend.dataset_name} cannot be loaded ({_reason(err)}); save it again "
                "with save_to_disk"
            ) from None
        if isinstance(rows, lib.DatasetDict):
            if backend.split not in rows:
                raise DataError(
                    f"{backend_field(backend.id, 'split')}: '{backend.split}' is not a split of {backend.dataset_name} "
                    f"(it has {', '.join(sorted(rows))}); choose one"
                )
            rows = rows[backend.split]
    else:
        files = parquet_files(backend.dataset_name)
        if not sum(_parquet_rows(key, f) for f in files):
            raise DataError(
                f"{key}: {backend.dataset_name} holds no rows (its parquet files are empty); point it at a dataset with images"
            )
        try:
            rows = lib.Dataset.from_parquet([str(p) for p in files], cache_dir=str(cache_dir))
        except Exception as err:  # noqa: BLE001 -- damaged data pages behind an intact footer, of many kinds
            raise DataError(
                f"{key}: the parquet files of {backend.dataset_name} cannot be read ({_reason(err)}); re-export them "
                "or remove the damaged file"
            ) from None
    wanted = ["image_column"] + (["caption_column"] if backend.caption_strategy == "huggingface" else [])
    wanted += ["mask_column"] if backend.mask_column else []
    for name in wanted:
        column = getattr(backend, name)
        if column not in rows.column_names:
            raise DataError(
                f"{backend_field(backend.id, name)}: {backend.dataset_name} has no column {column!r} "
                f"(its columns: {', '.join(rows.column_names)}); name one of them"
            )
        if isinstance(rows.features[column], lib.Image) and rows.features[column].decode:
            rows = rows.cast_column(column, lib.Image(decode=False))  # the bytes: decoded (and checked) later
    return rows


def _reason(err: BaseException) -> str:
    """The innermost cause of a library error, one short line."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _saved_empty(path: Path) -> bool:
    """A folder saved from an empty ``Dataset`` (``state.json`` lists no data files); ``datasets`` cannot load it."""
    import json

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _parquet_rows(key: str, file: Path) -> int:
    """The number of rows of a parquet file, from its footer; a file that has none (empty, truncated, not
    parquet) is refused by name."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(str(file)).num_rows
    except Exception as err:  # noqa: BLE001 -- pyarrow's ArrowInvalid / OSError, both "not a parquet file"
        raise DataError(
            f"{key}: {file} is not a readable parquet file ({_reason(err)}); re-export it or remove it from the "
            "folder/glob"
        ) from None


def _caption(value) -> str:
    if isinstance(value, (list, tuple)):  # several captions: the first non-empty one
        value = next((v for v in value if v is not None and str(v).strip()), "")
    return "" if value is None else str(value).strip()


def discover_rows(backend: ImageBackendConfig, cache_dir: Path) -> tuple[list[ImageRecord], list[Skip]]:
    """Captioned rows of a ``type: huggingface`` backend and the rows skipped (each also logged with
    its row index and reason); images are read later, like files."""
    rows = load_rows(backend, cache_dir)
    if len(rows) == 0:
        raise DataError(f"{backend_field(backend.id, 'dataset_name')}: {backend.dataset_name} holds no rows")
    path = Path(backend.dataset_name).expanduser()
    root = path if path.is_dir() else path.parent
    if backend.caption_strategy == "huggingface":
        captions = [_caption(c) for c in rows[backend.caption_column]]
    else:
        captions = [backend.instance_prompt] * len(rows)
    records, skips = [], []
    for i, caption in enumerate(captions):
        image = RowImage(backend.dataset_name, i, backend.image_column, rows, root)
        if not caption:
            skip(
                skips,
                image,
                f"empty caption in column {backend.caption_column!r} (write one; for unconditional "
                "training use caption_dropout_probability)",
            )
            continue
        mask = RowImage(backend.dataset_name, i, backend.mask_column, rows, root) if backend.mask_column else None
        records.append(ImageRecord(image, str(i), caption, 0, mask))
    return records, skips
