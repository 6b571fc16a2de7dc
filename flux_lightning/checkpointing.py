"""Files written atomically (checkpoints, safetensors): a kill during a save leaves the previous file intact."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to a temporary name in the same folder, then ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:16]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def build_folder_once(folder, build: Callable[[Path], None], marker: str | None = None) -> Path:
    """Create ``folder`` once: ``build(tmp)`` fills a sibling temporary folder that is then renamed
    into place, so a half-built folder is never seen. ``marker``: a file whose presence means the
    folder is complete (default: the folder existing)."""
    folder = Path(folder)

    def ready() -> bool:
        return (folder / marker).is_file() if marker else folder.is_dir()

    if ready():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first; its folder is identical
            if not ready():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
