"""Filling the caches: verify existing entries (a bad one is reported, removed and encoded again),
then encode what is missing -- VAE latents by bucket, masks, text embeddings in batches."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .. import stopping
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
            if s.backend in never_encode else f"re-encoding it from {s.path}"
        )
        entries.setdefault(cache.path(s.latent_key), (cache, s.latent_key, latent_spec(s.placement.bucket), remedy))
    discard_bad(list(entries.values()))


def discard_bad_masks(samples: Sequence[Sample], caches: dict[str, TensorCache]) -> None:
    """Check the mask entries of ``samples``, see :func:`discard_bad`."""
    entries = {
        caches[s.backend].path(s.mask_key): (
            caches[s.backend], s.mask_key, mask_spec(s.placement.bucket), f"re-encoding it from {s.mask_path}"
        )
        for s in samples if s.mask_key is not None
    }
    discard_bad(list(entries.values()))


def discard_bad_texts(captions: Sequence[str], cache: TensorCache, key: Callable[[str], str], spec: EntrySpec) -> None:
    """Check the text entries of ``captions`` (see :func:`discard_bad`); every entry must also have
    the embedding widths ``(D_t5, D_clip)`` most entries have."""
    keys = [key(c) for c in captions]
    entries = [(cache, k, spec, f"re-encoding caption {c[:60]!r}") for k, c in zip(keys, captions)]
    widths = {
        k: ((entry["prompt_embeds"].shape[1], entry["pooled_prompt_embeds"].shape[0]), caption)
        for k, caption, entry in zip(keys, captions, discard_bad(entries)) if entry is not None
    }
    if len({w for w, _ in widths.values()}) > 1:
        common = Counter(w for w, _ in widths.values()).most_common(1)[0][0]
        for k, (w, caption) in widths.items():
            if w != common:
                path = cache.path(k)
                log.warning(
                    "cache entry %s is corrupt (embedding widths %s, the other entries have %s); "
                    "re-encoding caption %r", path, w, common, caption[:60],
                )
                path.unlink(missing_ok=True)


def cache_latents(vae, todo: list[Sample], caches: dict[str, TensorCache], batch_size: int) -> None:
    """Encode ``todo`` bucket by bucket, ``batch_size`` images per VAE call; an image that cannot
    be decoded is skipped with a warning (it stays missing, so the sample is not used)."""
    by_bucket: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for s in todo:
        by_bucket[s.placement.bucket].append(s)
    bar = tqdm(total=len(todo), desc="caching VAE latents", unit="img")
    for group in by_bucket.values():
        for start in range(0, len(group), batch_size):
            stopping.check()  # SIGTERM/SIGINT: stop between batches (every entry is written atomically)
            chunk = group[start : start + batch_size]
            batch, pixels = [], []
            for s in chunk:
                try:
                    pixels.append(to_pixels(load_rgb(s.path), s.placement))
                    batch.append(s)
                except Exception as err:
                    log.warning("skipping %s: cannot decode image (%s)", s.path, err)
            if batch:
                latents = encode_images(vae, torch.stack(pixels), [_seed_of(s.latent_key) for s in batch])
                for s, z in zip(batch, latents):
                    caches[s.backend].save(s.latent_key, {"latents": z}, {"file": s.path.name})
            bar.update(len(chunk))
    bar.close()


def cache_masks(samples: Sequence[Sample], caches: dict[str, TensorCache]) -> None:
    """Write the missing mask entries of ``samples`` (an unreadable mask is skipped with a warning)."""
    for s in samples:
        cache = caches[s.backend]
        if s.mask_key is not None and s.mask_key not in cache:
            try:
                mask = load_mask(s.mask_path, s.size, s.placement, alpha=s.mask_alpha)
            except Exception as err:
                log.warning("skipping %s: cannot read its mask %s (%s)", s.path, s.mask_path, err)
                continue
            cache.save(s.mask_key, {"mask": mask}, {"file": s.mask_path.name})


def cache_texts(
    parts: dict, captions: list[str], cache: TensorCache, key: Callable[[str], str], batch_size: int, t5_length: int
) -> None:
    """Encode ``captions`` with the text encoders in ``parts``, ``batch_size`` per call."""
    for start in tqdm(range(0, len(captions), batch_size), desc="caching text embeddings", unit="batch"):
        stopping.check()
        chunk = captions[start : start + batch_size]
        out = encode_prompts(parts, chunk, t5_length)
        for j, caption in enumerate(chunk):
            cache.save(key(caption), {k: v[j] for k, v in out.items()}, {"caption": caption[:200]})
