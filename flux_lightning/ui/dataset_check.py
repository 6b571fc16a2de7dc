"""The dataset check: what training would make of a folder or a ``multidatabackend.json``, before
any model loads.

The library's own pieces do the work, so the answer is what a run would do: the config's
``problems()``, :func:`~flux_lightning.data.backend_file.resolve_dataset` (the JSON file),
:class:`~flux_lightning.data.resolve.SampleResolver` (discovery, captions, the size checks from the
file headers, buckets) and :func:`~flux_lightning.data.discovery.scan_folder` (files not used).
The files a run skips are the ones it skips: the resolver returns them with the reason
(:class:`~flux_lightning.data.discovery.Skip`); the data package's other warnings are the notes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..data.backend_file import resolve_dataset
from ..data.config import DatasetConfig, ImageBackendConfig
from ..data.discovery import SKIP_RECORD, scan_folder
from ..data.resolve import SampleResolver
from ..errors import DataError

_LOGGER = "flux_lightning.data"


class _Notes(logging.Handler):
    """Collects this thread's warnings of the data package other than skips (those are returned)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and not getattr(record, SKIP_RECORD, False):
            self.notes.append(record.getMessage())


def _absolute(backend: ImageBackendConfig, workdir: Path | None) -> ImageBackendConfig:
    if workdir is None or backend.instance_data_dir is None:
        return backend
    folders = [
        str(workdir / Path(d).expanduser()) if not Path(d).expanduser().is_absolute() else d for d in backend.folders()
    ]
    return replace(backend, instance_data_dir=folders if isinstance(backend.instance_data_dir, list) else folders[0])


def dataset_config(
    path: str | os.PathLike,
    *,
    resolution: int = 1024,
    caption_strategy: str | None = None,
    instance_prompt: str | None = None,
) -> DatasetConfig:
    """The dataset config a run would have for ``path``: a folder is the single-folder shorthand
    (``dataset.instance_data_dir=<folder>``), a ``.json`` file is ``dataset.backend_file=<file>``."""
    path = Path(path).expanduser()
    if path.is_file() or path.suffix.lower() == ".json":
        return DatasetConfig(backend_file=str(path))
    return DatasetConfig(
        instance_data_dir=str(path),
        resolution=resolution,
        caption_strategy=caption_strategy,
        instance_prompt=instance_prompt,
    )


def check_dataset(
    path: str | os.PathLike,
    *,
    resolution: int = 1024,
    caption_strategy: str | None = None,
    instance_prompt: str | None = None,
    limit_samples: int = 5,
    workdir: str | os.PathLike | None = None,
    readable=None,
) -> dict:
    """What training would use of ``path`` (a folder, or a ``multidatabackend.json`` whose relative
    folders are relative to ``workdir``, default the current dir), without loading any model.

    Returns:
        ``{"backends": [{"id", "kind", "folders", "images", "buckets": [{"width", "height", "count"}],
        "samples": [{"file", "caption", "size", "bucket"}], "skipped": [{"file", "reason"}],
        "ignored": [{"file", "reason"}]}], "problems": [...], "notes": [...]}``: ``images`` counts the
        usable images, ``skipped`` the image files a run skips (with its reason), ``ignored`` other
        files it does not use; ``problems`` are what stops a run (one line each, naming the field).

    ``readable(path) -> bool`` (the web UI's data roots): a backend with a path it refuses (folder,
    metadata table, dataset) is not looked at, and the answer says nothing of those paths but that
    they are outside (no counts, no existence).
    """
    base = Path(workdir).resolve() if workdir is not None else None
    path = Path(path).expanduser()
    path = (base / path if base is not None and not path.is_absolute() else path).absolute()
    cfg = dataset_config(
        path, resolution=resolution, caption_strategy=caption_strategy, instance_prompt=instance_prompt
    )
    problems: list[str] = []
    out = {"backends": [], "problems": problems, "notes": []}
    handler = _Notes()
    logger = logging.getLogger(_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        try:
            cfg = resolve_dataset(cfg)
        except DataError as err:
            problems += [ln.strip() for ln in str(err).split("\n  - ") if ln.strip()]
            return out
        backends = [_absolute(b, base) for b in cfg.image_backends()]
        outside = {b.id: [p for p in _paths(b) if not readable(p)] for b in backends} if readable else {}
        hidden = [p for paths in outside.values() for p in paths]
        problems += [line for line in cfg.problems() if not any(p in line for p in hidden)]
        resolver = SampleResolver(cfg, backends, lambda b: b.folders(), lambda caption: "", {})
        for backend in backends:
            if outside.get(backend.id):
                problems.append(
                    f"backend {backend.id}: {', '.join(outside[backend.id])} is outside the folders this UI may read; "
                    "start the UI with --data-root <folder> to check it"
                )
                out["backends"].append(
                    {
                        "id": backend.id,
                        "kind": "outside",
                        "folders": [],
                        "images": None,
                        "buckets": [],
                        "samples": [],
                        "skipped": [],
                        "ignored": [],
                    }
                )
                continue
            out["backends"].append(_check_backend(resolver, backend, problems, limit_samples, readable))
        out["notes"] = [n for n in handler.notes if not any(p in n for p in hidden)]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out


def _paths(backend: ImageBackendConfig) -> list[str]:
    """Every path the check would follow for ``backend``: its folders, its metadata table, its dataset."""
    paths = list(backend.folders())
    for name in ("metadata_file", "dataset_name"):
        value = getattr(backend, name, None)
        if (
            isinstance(value, str)
            and value
            and (name != "dataset_name" or getattr(backend, "type", "local") == "huggingface")
        ):
            paths.append(value)
    return [str(p) for p in paths]


def _check_backend(
    resolver: SampleResolver, backend: ImageBackendConfig, problems: list[str], limit: int, readable=None
) -> dict:
    kind = backend.dataset_type if backend.dataset_type == "image" else f"conditioning/{backend.conditioning_type}"
    entry = {
        "id": backend.id,
        "kind": kind,
        "folders": backend.folders(),
        "images": 0,
        "buckets": [],
        "samples": [],
        "skipped": [],
        "ignored": [],
    }
    for folder in backend.folders():
        try:
            entry["ignored"] += [{"file": str(p), "reason": why} for p, why in scan_folder(folder).ignored]
        except DataError:
            pass  # reported by resolve() below, naming the backend's field
    if backend.dataset_type != "image":
        found = []
        for folder in backend.folders():
            try:
                found += scan_folder(folder).images
            except DataError as err:
                problems.append(str(err))
        entry["images"] = len([f for f in found if readable is None or readable(f)])
        return entry
    try:
        samples, skips = resolver.resolve(backend)
    except DataError as err:
        problems.append(str(err))
        samples, skips = [], []
    entry["skipped"] = [{"file": str(s.path), "reason": s.reason} for s in skips]
    if readable is not None:  # a symlink inside a root may lead out of it: such files are neither counted nor named
        kept = [s for s in samples if readable(s.path)]
        kept_skipped = [s for s in entry["skipped"] if readable(s["file"])]
        kept_ignored = [i for i in entry["ignored"] if readable(i["file"])]
        if len(kept) + len(kept_skipped) + len(kept_ignored) < len(samples) + len(entry["skipped"]) + len(
            entry["ignored"]
        ):
            problems.append(
                f"backend {backend.id}: some files lead outside the folders this UI may read (symlinks); "
                "they are not counted here (training would use them); start the UI with --data-root <folder> to check them"
            )
        samples, entry["skipped"], entry["ignored"] = kept, kept_skipped, kept_ignored
    entry["images"] = len(samples)
    counts = Counter(s.placement.bucket for s in samples)
    entry["buckets"] = [
        {"width": w, "height": h, "count": n} for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    entry["samples"] = [
        {"file": str(s.path), "caption": s.caption, "size": list(s.size), "bucket": list(s.placement.bucket)}
        for s in samples[: max(0, limit)]
    ]
    return entry
