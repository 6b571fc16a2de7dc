"""Filling the caches: verify existing entries (a bad one is reported, removed and encoded again),
then encode what is missing -- VAE latents by bucket (images decoded by DataLoader workers), masks,
text embeddings in batches. The work is cut into chunks that do not depend on the number of
ranks; several ranks each encode every ``size``-th chunk (see :mod:`.ranks`)."""

from __future__ import annotations

import logging
import signal
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..training import stopping
from .cache import CacheEntryError, EntrySpec, TensorCache, latent_spec, load_many, mask_spec
from .encoding import encode_images, encode_prompts
from .resolve import Sample
from .transforms import load_mask, load_rgb, to_pixels

log = logging.getLogger(__name__)


def _seed_of(key: str) -> int:
    return int(key[:15], 16)


def discard_bad(entries: list[tuple[TensorCache, str, EntrySpec, str]]) -> list[dict | None]:
    """Verify the existing entries of ``(cache, key, spec, remedy)`` (:func:`load_many`): a bad one
    is reported once, by file name, with ``remedy``, and removed, so it counts as missing and is
    encoded again. Returns the tensors of each good entry, None for bad or absent ones."""
    present = [e for e in entries if e[1] in e[0]]
    results = dict(zip((e[0].path(e[1]) for e in present), load_many([e[:3] for e in present])))
    out = []
    for cache, key, _, remedy in entries:
        result = results.get(cache.path(key))
        if isinstance(result, CacheEntryError):
            log.warning("cache entry %s is corrupt (%s); %s", result.path, result.reason, remedy)
            result.path.unlink(missing_ok=True)
            result = None
        out.append(result)
    return out


def discard_bad_latents(samples: Sequence[Sample], caches: dict[str, TensorCache], never_encode: set[str]) -> None:
    """Check the latent entries of ``samples`` (each file once), see :func:`discard_bad`;
    ``never_encode``: backends whose entries are not re-encoded (``skip_file_discovery=vae``)."""
    entries = {}
    for s in samples:
        cache = caches[s.backend]
        remedy = (
            f"backend {s.backend!r} has skip_file_discovery=vae, so it is not re-encoded and {s.path} is skipped"
            if s.backend in never_encode
            else f"re-encoding it from {s.path}"
        )
        entries.setdefault(cache.path(s.latent_key), (cache, s.latent_key, latent_spec(s.placement.bucket), remedy))
    discard_bad(list(entries.values()))


def discard_bad_masks(samples: Sequence[Sample], caches: dict[str, TensorCache]) -> None:
    """Check the mask entries of ``samples``, see :func:`discard_bad`."""
    entries = {
        caches[s.backend].path(s.mask_key): (
            caches[s.backend],
            s.mask_key,
            mask_spec(s.placement.bucket),
            f"re-encoding it from {s.mask_path}",
        )
        for s in samples
        if s.mask_key is not None
    }
    discard_bad(list(entries.values()))


def discard_bad_texts(captions: Sequence[str], cache: TensorCache, key: Callable[[str], str], spec: EntrySpec) -> None:
    """Check the text entries of ``captions`` (see :func:`discard_bad`); every entry must also have
    the embedding widths ``(D_t5, D_clip)`` most entries have."""
    keys = [key(c) for c in captions]
    entries = [(cache, k, spec, f"re-encoding caption {c[:60]!r}") for k, c in zip(keys, captions)]
    widths = {
        k: ((entry["prompt_embeds"].shape[1], entry["pooled_prompt_embeds"].shape[0]), caption)
        for k, caption, entry in zip(keys, captions, discard_bad(entries))
        if entry is not None
    }
    if len({w for w, _ in widths.values()}) > 1:
        common = Counter(w for w, _ in widths.values()).most_common(1)[0][0]
        for k, (w, caption) in widths.items():
            if w != common:
                path = cache.path(k)
                log.warning(
                    "cache entry %s is corrupt (embedding widths %s, the other entries have %s); "
                    "re-encoding caption %r",
                    path,
                    w,
                    common,
                    caption[:60],
                )
                path.unlink(missing_ok=True)


def latent_chunks(todo: Sequence[Sample], batch_size: int) -> list[list[Sample]]:
    """The VAE calls of ``todo``: bucket by bucket (first-seen order), ``batch_size`` images each.
    The chunks are the same whatever the number of ranks, which share them out whole
    (:func:`.ranks.share`), so an entry is computed by the same call however the work is split."""
    by_bucket: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for s in todo:
        by_bucket[s.placement.bucket].append(s)
    return [group[i : i + batch_size] for group in by_bucket.values() for i in range(0, len(group), batch_size)]


class DecodedChunks(Dataset):
    """Item ``j``: chunk ``j``'s images decoded, upright, resized and cropped to their placement,
    ``(pixels (B,3,H,W) or None, indices decoded, [(file, error)] of the rest)``; run by DataLoader
    workers so decoding overlaps the VAE."""

    def __init__(self, chunks: list[list[Sample]]):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int):
        pixels, ok, errors = [], [], []
        for i, s in enumerate(self.chunks[j]):
            try:
                pixels.append(to_pixels(load_rgb(s.path), s.placement))
                ok.append(i)
            except Exception as err:
                errors.append((str(s.path), str(err)))
        return (torch.stack(pixels) if pixels else None), ok, errors


def _worker_ignores_stop_signals(_: int) -> None:
    """A Ctrl+C reaches the whole process group: the main process stops (and ends its workers)."""
    for sig in stopping.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def cache_latents(vae, chunks: list[list[Sample]], caches: dict[str, TensorCache], workers: int = 0) -> list[str]:
    """Encode ``chunks`` (:func:`latent_chunks`), one VAE call each, images decoded by ``workers``
    DataLoader workers in order; an image that cannot be decoded is skipped with a warning (it
    stays missing, so the sample is not used). Returns the keys written."""
    written: list[str] = []
    if not chunks:
        return written
    loader = DataLoader(
        DecodedChunks(chunks),
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_worker_ignores_stop_signals if workers else None,
        # its own generator: an iterator draws a base seed, which must not come from the global RNG
        # (the LoRA's init and the training draws follow caching; a warm-cache re-run never iterates)
        generator=torch.Generator().manual_seed(0),
    )
    bar = tqdm(total=sum(len(c) for c in chunks), desc="caching VAE latents", unit="img")
    decoded = iter(loader)
    try:
        for chunk in chunks:
            stopping.check()  # SIGTERM/SIGINT: stop between batches (every entry is written atomically)
            try:
                pixels, ok, errors = next(decoded)
            except Exception:
                stopping.check()  # a worker ended by the signal: the stop, not the worker, is the news
                raise
            for path, err in errors:
                log.warning("skipping %s: cannot decode image (%s)", path, err)
            if ok:
                batch = [chunk[i] for i in ok]
                latents = encode_images(vae, pixels, [_seed_of(s.latent_key) for s in batch])
                for s, z in zip(batch, latents):
                    caches[s.backend].save(s.latent_key, {"latents": z}, {"file": s.path.name})
                    written.append(s.latent_key)
            bar.update(len(chunk))
    finally:
        bar.close()
        del decoded  # ends the workers now
    return written


def missing_masks(samples: Sequence[Sample], caches: dict[str, TensorCache]) -> list[Sample]:
    """``samples`` whose mask entry is missing (each entry once)."""
    return list(
        {s.mask_key: s for s in samples if s.mask_key is not None and s.mask_key not in caches[s.backend]}.values()
    )


def cache_masks(samples: Sequence[Sample], caches: dict[str, TensorCache]) -> None:
    """Write the mask entries of ``samples`` (an unreadable mask is skipped with a warning)."""
    for s in samples:
        stopping.check()
        cache = caches[s.backend]
        if s.mask_key is not None:
            try:
                mask = load_mask(s.mask_path, s.size, s.placement, alpha=s.mask_alpha)
            except Exception as err:
                log.warning("skipping %s: cannot read its mask %s (%s)", s.path, s.mask_path, err)
                continue
            cache.save(s.mask_key, {"mask": mask}, {"file": s.mask_path.name})


def text_chunks(captions: list[str], batch_size: int) -> list[list[str]]:
    """The text-encoder calls of ``captions``, ``batch_size`` each (shared out whole, like latents)."""
    return [captions[i : i + batch_size] for i in range(0, len(captions), batch_size)]


def cache_texts(
    parts: dict, chunks: list[list[str]], cache: TensorCache, key: Callable[[str], str], t5_length: int
) -> list[str]:
    """Encode each chunk of captions (:func:`text_chunks`) in one text-encoder call; returns the keys written."""
    written = []
    for chunk in tqdm(chunks, desc="caching text embeddings", unit="batch"):
        stopping.check()
        out = encode_prompts(parts, chunk, t5_length)
        for j, caption in enumerate(chunk):
            cache.save(key(caption), {k: v[j] for k, v in out.items()}, {"caption": caption[:200]})
            written.append(key(caption))
    return written
