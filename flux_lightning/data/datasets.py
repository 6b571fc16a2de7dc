"""The training dataset over the caches, and the default number of dataloader workers."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .cache import StandIns, TensorCache, latent_spec, mask_spec, text_spec
from .resolve import Sample


def default_num_workers() -> int:
    """Dataloader workers when ``dataset.num_workers`` is null.

    With a GPU, up to 4 per device (bounded by the CPU cores): reading cached safetensors and
    collating overlaps the step. On CPU-only machines 0: the training step itself needs every core,
    and cached batches are cheap to read in the main process.
    """
    if not torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, torch.cuda.device_count()) - 1))


class CachedLatentDataset(Dataset):
    """Items ``{latents, prompt_embeds, pooled_prompt_embeds, attention_mask[, mask][, reference_latents][, is_regularisation]}``.

    ``latents`` and ``reference_latents`` are ``(16, H, W)`` (the sample's bucket / 8). Indices
    are ``(epoch, i)`` pairs (see :class:`~flux_lightning.data.sampler.BucketBatchSampler`) so
    caption dropout is a deterministic function of ``(seed, epoch, i)``: the same in every worker
    and after a resume. ``mask``, ``reference_latents`` and ``is_regularisation`` appear only for
    backends that have them, and a batch never mixes backends.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        latent_caches: dict[str, TensorCache],
        texts: TensorCache,
        empty_text_key: str,
        dropout: dict[str, float],
        regularisation: set[str],
        seed: int = 0,
        t5_length: int | None = None,
    ):
        self.samples = list(samples)
        self.latent_caches, self.texts = latent_caches, texts
        self.empty_text_key = empty_text_key
        self.dropout, self.regularisation, self.seed = dropout, regularisation, seed
        self.text_spec = text_spec(t5_length) if t5_length else None
        self.stand_ins = StandIns(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        """Item ``i`` of ``index = (epoch, i)``; every entry is verified as it is read, and a sample
        whose entries went bad since ``prepare_data`` is replaced (see :class:`StandIns`)."""
        epoch, i = index if isinstance(index, tuple) else (0, index)
        return self.stand_ins.serve(i, lambda j: self.item(epoch, j))

    def item(self, epoch: int, i: int) -> dict[str, torch.Tensor]:
        """Item ``i`` as read; raises :class:`CacheEntryError` naming a bad entry."""
        s = self.samples[i]
        p = self.dropout.get(s.backend, 0.0)
        drop = p > 0 and random.Random(f"{self.seed}:{epoch}:{i}").random() < p
        cache = self.latent_caches[s.backend]
        spec = latent_spec(s.placement.bucket)
        item = dict(cache.load(s.latent_key, spec))
        item.update(self.texts.load(self.empty_text_key if drop else s.text_key, self.text_spec))
        if s.mask_key is not None:
            item["mask"] = cache.load(s.mask_key, mask_spec(s.placement.bucket))["mask"]
        if s.reference is not None:
            item["reference_latents"] = self.latent_caches[s.reference.backend].load(s.reference.latent_key, spec)[
                "latents"
            ]
        if s.backend in self.regularisation:
            item["is_regularisation"] = torch.tensor(True)
        return item
