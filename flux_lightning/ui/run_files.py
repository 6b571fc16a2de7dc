"""Reading the files of a run dir for the UI: paths confined to a folder (:func:`inside`), a log's tail,
Lightning's ``metrics.csv``, modification times. No process or Lightning state; :mod:`runs` uses these."""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path, PurePosixPath

LOG_TAIL_LINES = 200


# -- paths --------------------------------------------------------------------------------------
def inside(root: str | os.PathLike, relpath: str) -> Path:
    """The file ``relpath`` under ``root``, resolved (symlinks followed).

    Raises:
        PermissionError: an absolute path, a ``..`` part, or a path (or symlink) that leads outside ``root``.
        FileNotFoundError: no such file.
    """
    root = Path(root).resolve()
    text = str(relpath).replace("\\", "/")
    rel = PurePosixPath(text)
    if not text or rel.is_absolute() or ".." in rel.parts or re.match(r"^[A-Za-z]:", text):
        raise PermissionError(f"{relpath!r}: only paths inside {root.name}/ can be read (no absolute paths, no '..')")
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise PermissionError(f"{relpath!r} leads outside {root.name}/ (a symlink); it cannot be read here")
    if not target.is_file():
        raise FileNotFoundError(f"{relpath} does not exist in {root.name}/")
    return target


def data_file(root: str | os.PathLike, relpath: str) -> Path:
    """A dataset file for a preview, with the rule of :func:`inside`."""
    return inside(root, relpath)


# -- reading a run's files ----------------------------------------------------------------------------------
def finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def read_csv_metrics(path: Path) -> dict[str, list]:
    """tag -> [[step, value], ...] of a Lightning ``metrics.csv`` (a step that goes back, after a
    resume from an older checkpoint, replaces the points from there on, as TensorBoard does)."""
    series: dict[str, list] = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(float(row.get("step") or 0))
                except ValueError:
                    continue
                for tag, text in row.items():
                    if tag in ("step", "epoch") or text in (None, ""):
                        continue
                    try:
                        value = finite_or_none(text)
                    except ValueError:
                        continue
                    points = series.setdefault(tag, [])
                    while points and points[-1][0] >= step:
                        points.pop()
                    points.append([step, value])
    except OSError:
        return {}
    return series


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log; a progress bar's carriage-return redraws keep their last."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    out = [ln.rstrip("\r").split("\r")[-1] for ln in data.split("\n")]
    if size > 256 * 1024 and out:
        out = out[1:]
    while out and not out[-1]:
        out.pop()
    return "\n".join(out[-lines:])


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def mtime_or0(path: Path) -> float:
    return mtime(path) or 0.0


def newest(paths) -> Path | None:
    paths = [p for p in paths if p.is_file()]
    return max(paths, key=mtime_or0) if paths else None
