"""The held-out eval split: a deterministic fraction of the source images of large backends, and the eval dataset."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .cache import EntrySpec, StandIns, TensorCache, latent_spec


def holdout_count(n: int, fraction: float) -> int:
    """``round(fraction * n)``, at least 1 when ``fraction > 0``, and leaving at least one image to train."""
    if fraction <= 0:
        return 0
    if n < 2:
        raise DataError(
            f"dataset.eval_fraction={fraction} needs at least 2 images to hold one out (found {n}); "
            "add images, use dataset.eval_data_dir, or set dataset.eval_fraction=0"
        )
    return min(n - 1, max(1, round(fraction * n)))


def select_holdout(keys: Sequence[str], fraction: float) -> set[str]:
    """The keys held out for evaluation: the first ``holdout_count`` keys ordered by
    ``sha256("holdout:" + key)``. Depends only on the keys, not on file order, seed or the
    machine; keys that appear twice are held out together."""
    unique = sorted(set(keys), key=lambda k: hashlib.sha256(f"holdout:{k}".encode()).hexdigest())
    return set(unique[: holdout_count(len(unique), fraction)])


def split_sources(
    backend_sources: Mapping[str, Iterable[str]], fraction: float, min_images: int
) -> tuple[set[str], list[str]]:
    """Source images (content digests) held out, and the backends they may come from.

    Only a backend with at least ``min_images`` distinct source images is large enough to give
    some away, and a source that is also in a smaller backend stays in training, so small datasets
    always train on every image. All copies of a held-out source (its crops, resolutions and
    backends) leave training together. Of the ``n`` eligible sources ``holdout_count(n, fraction)``
    are held out (:func:`select_holdout`).

    Args:
        backend_sources: backend id -> the content digests of its usable images.
        fraction: ``dataset.eval_fraction``.
        min_images: ``dataset.eval_min_images``.
    """
    sources = {b: set(s) for b, s in backend_sources.items()}
    large = sorted(b for b, s in sources.items() if len(s) >= min_images)
    in_small = set().union(*(s for b, s in sources.items() if b not in large))
    pool = set().union(*(sources[b] for b in large)) - in_small
    if fraction <= 0 or not pool:
        return set(), large
    return select_holdout(sorted(pool), fraction), large


class EvalDataset(Dataset):
    """Items ``{latents, prompt_embeds, pooled_prompt_embeds, attention_mask, backend}`` with the
    real captions (no caption dropout); ``samples`` are the datamodule's resolved samples."""

    def __init__(
        self,
        samples: Sequence,
        latent_caches: dict[str, TensorCache],
        texts: TensorCache,
        text_spec: EntrySpec | None = None,
    ):
        self.samples = list(samples)
        self.latent_caches, self.texts, self.text_spec = latent_caches, texts, text_spec
        self.stand_ins = StandIns(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        """Verified entries; a sample whose entries went bad is replaced (see :class:`StandIns`)."""
        return self.stand_ins.serve(index, self.item)

    def item(self, index: int) -> dict[str, torch.Tensor | str]:
        s = self.samples[index]
        cache = self.latent_caches[s.backend]
        item: dict[str, torch.Tensor | str] = dict(cache.load(s.latent_key, latent_spec(s.placement.bucket)))
        item.update(self.texts.load(s.text_key, self.text_spec))
        item["backend"] = s.backend
        return item
