"""Content-addressed on-disk tensor caches (VAE latents, text embeddings).

An entry's key is the SHA-256 of every input that determines it (see :func:`cache_key`), so a
changed setting gives a new key and a stale entry is never served. Entries are safetensors files
written to a temporary name and renamed into place, so a killed writer leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpointing import save_safetensors_atomic


def cache_key(**fields) -> str:
    """SHA-256 over the JSON of ``fields`` (sorted keys): the entry's identity."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-1 of a file's bytes (content identity, independent of name and mtime)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TensorCache:
    """A folder of ``<key[:2]>/<key>.safetensors`` entries."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.expanduser(root))

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(key))

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_safetensors_atomic(tensors, self.path(key), {k: str(v) for k, v in (metadata or {}).items()})
