"""Content-addressed on-disk tensor caches (VAE latents, text embeddings, loss masks).

An entry's key is the SHA-256 of every input that determines it (see :func:`cache_key`), so a
changed setting gives a new key and a stale entry is never served. Entries are safetensors files
written to a temporary name and renamed into place, so a killed writer leaves no partial entry;
each records its key in the safetensors metadata (``"key"``).

Every read is verified (:meth:`TensorCache.load`): the header parses and covers the whole file
(truncated and zero-byte files fail here), the entry claims the key it is stored under, it holds
exactly the tensors of its kind (:class:`EntrySpec`) with the expected shapes and dtypes, and
every value is finite (and within range for masks). A failure raises :class:`CacheEntryError`
naming the file, never returns garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic_files import save_safetensors_atomic
from ..errors import CacheEntryError

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # the FLUX.1 VAE (and the tiny one)
VAE_FACTOR = 8  # pixels per latent cell

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "BOOL": torch.bool}


def cache_key(**fields) -> str:
    """SHA-256 over the JSON of ``fields`` (sorted keys): the entry's identity."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-1 of a file's bytes (content identity, independent of name and mtime); ``path`` may
    also be an image that is not a file, with ``open()`` returning its bytes as a binary file."""
    h = hashlib.sha1()
    with open(path, "rb") if isinstance(path, (str, os.PathLike)) else path.open() as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EntrySpec:
    """What an entry of one kind holds: ``tensors`` = ``(name, shape, dtype)`` with ``None`` for a
    size that may be anything; float values must be finite and, with ``value_range``, within it."""

    kind: str
    tensors: tuple[tuple[str, tuple[int | None, ...], torch.dtype], ...]
    value_range: tuple[float, float] | None = None


def latent_spec(bucket: tuple[int, int]) -> EntrySpec:
    """A VAE latent of an image in ``bucket`` = ``(width, height)``: ``latents`` ``(16, h/8, w/8)`` float32."""
    w, h = bucket
    return EntrySpec("latent", (("latents", (LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR), torch.float32),))


def mask_spec(bucket: tuple[int, int]) -> EntrySpec:
    """A loss mask at latent size: ``mask`` ``(1, h/8, w/8)`` float32 in [0, 1]."""
    w, h = bucket
    return EntrySpec("mask", (("mask", (1, h // VAE_FACTOR, w // VAE_FACTOR), torch.float32),), (0.0, 1.0))


def text_spec(t5_length: int, dims: tuple[int | None, int | None] = (None, None)) -> EntrySpec:
    """Flux text conditioning: ``prompt_embeds`` ``(T, D_t5)``, ``pooled_prompt_embeds`` ``(D_clip,)``
    float32 and the T5 ``attention_mask`` ``(T,)`` uint8, ``T`` = the flavour's ``t5_max_length``;
    ``dims`` = ``(D_t5, D_clip)`` when known."""
    d_t5, d_clip = dims
    return EntrySpec(
        "text",
        (
            ("prompt_embeds", (t5_length, d_t5), torch.float32),
            ("pooled_prompt_embeds", (d_clip,), torch.float32),
            ("attention_mask", (t5_length,), torch.uint8),
        ),
    )


def _shape_text(dims) -> str:
    """``(16, 8, 8)``, ``(4,)``, ``(32, *)`` (``*``: any size)."""
    parts = ["*" if d is None else str(d) for d in dims]
    return f"({', '.join(parts)}{',' if len(parts) == 1 else ''})"


def _shape_problem(name: str, shape: list[int], dtype: str, expected: tuple, want: torch.dtype) -> str | None:
    if _DTYPES.get(dtype) != want:
        return f"'{name}' is {dtype}, expected {str(want).removeprefix('torch.')}"
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        return f"'{name}' has shape {_shape_text(shape)}, expected {_shape_text(expected)}"
    return None


class TensorCache:
    """A folder of ``<key[:2]>/<key>.safetensors`` entries."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.expanduser(root))

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str, spec: EntrySpec | None = None) -> dict[str, torch.Tensor]:
        """The entry's tensors, verified (see the module docstring); ``spec`` adds the names,
        shapes and dtypes of its kind. Raises :class:`CacheEntryError` (missing entries too)."""
        path = self.path(key)
        try:
            with safe_open(path, "pt") as f:  # parses the header; a truncated/zero-byte file fails here
                claimed = (f.metadata() or {}).get("key")
                if claimed is not None and claimed != key:  # entries written before keys were recorded: no claim
                    raise CacheEntryError(path, f"it claims key {claimed[:16]}..., not its file name")
                names = set(f.keys())
                if spec is not None:
                    expected = {name for name, _, _ in spec.tensors}
                    if names != expected:
                        raise CacheEntryError(
                            path, f"holds tensors {sorted(names)}, a {spec.kind} entry holds {sorted(expected)}"
                        )
                    for name, shape, dtype in spec.tensors:
                        view = f.get_slice(name)
                        problem = _shape_problem(name, view.get_shape(), view.get_dtype(), shape, dtype)
                        if problem:
                            raise CacheEntryError(path, problem)
                tensors = {name: f.get_tensor(name) for name in sorted(names)}
        except FileNotFoundError:
            raise CacheEntryError(path, "missing") from None
        except (SafetensorError, OSError, ValueError) as err:
            raise CacheEntryError(path, f"unreadable: {err}") from None
        for name, t in tensors.items():
            if t.is_floating_point():
                # one reduction (NaN and inf propagate through a sum); a sum that overflowed is
                # confirmed element-wise, so large finite values are never flagged
                if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                    raise CacheEntryError(path, f"'{name}' holds NaN or infinite values")
                if spec is not None and spec.value_range is not None:
                    lo, hi = spec.value_range
                    if t.numel() and (t.min() < lo or t.max() > hi):
                        raise CacheEntryError(path, f"'{name}' has values outside [{lo:g}, {hi:g}]")
        return tensors

    def problem(self, key: str, spec: EntrySpec | None = None) -> str | None:
        """Why the existing entry ``key`` cannot be used, or None when it is fine (or absent)."""
        if key not in self:
            return None
        try:
            self.load(key, spec)
        except CacheEntryError as err:
            return err.reason
        return None

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        """Write the entry atomically, recording ``key`` in its metadata."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        save_safetensors_atomic(tensors, self.path(key), {**meta, "key": key})


def load_many(
    entries: list[tuple[TensorCache, str, EntrySpec | None]], workers: int | None = None
) -> list[dict[str, torch.Tensor] | CacheEntryError]:
    """:meth:`TensorCache.load` for each ``(cache, key, spec)``, in threads (reading and summing
    release the GIL, so large entries verify in parallel); each result is the tensors or the
    :class:`CacheEntryError`, in the order given. ``workers``: default ``min(8, CPU cores)``."""

    def one(entry):
        cache, key, spec = entry
        try:
            return cache.load(key, spec)
        except CacheEntryError as err:
            return err

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(entries) < 2:
        return [one(e) for e in entries]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, entries, chunksize=64))


class StandIns:
    """Serves a dataset item, or a deterministic stand-in when its cache entries went bad after
    ``prepare_data`` (which re-encodes bad entries before training): the next sample, in index
    order and wrapping around, of the same backend and bucket, so the batch keeps its shapes and a
    rerun over the same files draws the same stand-in. Each bad file is reported once per process.

    Args:
        samples: objects with ``backend`` and ``placement.bucket`` (the datamodule's samples).
    """

    def __init__(self, samples):
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault((s.backend, s.placement.bucket), []).append(i)
        self._group_of = {i: idx for idx in groups.values() for i in idx}
        self._reported: set[Path] = set()

    def serve(self, i: int, load) -> dict:
        """``load(j)`` for ``j = i`` or the first usable stand-in; raises :class:`CacheEntryError`
        (naming the first bad file) when no sample of the group is usable."""
        group = self._group_of[i]
        start = group.index(i)
        first: CacheEntryError | None = None
        for j in group[start:] + group[:start]:
            try:
                item = load(j)
            except CacheEntryError as err:
                first = first or err
                if err.path not in self._reported:
                    self._reported.add(err.path)
                    log.warning(
                        "cache entry %s is corrupt (%s): this run serves another sample of its bucket "
                        "in its place; run again and prepare_data re-encodes it",
                        err.path,
                        err.reason,
                    )
                continue
            return item
        raise first
