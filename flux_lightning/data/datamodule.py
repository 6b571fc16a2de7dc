"""``FluxDataModule``: discover images, fill the latent and text caches, serve cached batches."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..components import ModelConfig, load_text_encoders, load_vae, model_identity
from .cache import TensorCache, cache_key, file_digest
from .config import DatasetConfig
from .demo import make_demo_dataset
from .discovery import DataError, ImageRecord, discover
from .encoding import encode_images, encode_prompts
from .transforms import crop_box, load_rgb, to_pixels

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Sample:
    """One training image resolved to its cache entries."""

    record: ImageRecord
    latent_key: str
    text_key: str
    box: tuple[int, int, int, int]


def _upright_size(path: Path) -> tuple[int, int]:
    """Image size after EXIF rotation, read from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


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


def _seed_of(key: str) -> int:
    return int(key[:15], 16)


class CachedLatentDataset(Dataset):
    """Items are ``{latents, prompt_embeds, pooled_prompt_embeds, attention_mask}`` read from caches.

    Indices are ``(epoch, i)`` pairs (see :class:`EpochSampler`) so that caption dropout is a
    deterministic function of ``(seed, epoch, i)``: the same in every worker and after a resume.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        latents: TensorCache,
        texts: TensorCache,
        empty_text_key: str,
        caption_dropout_probability: float = 0.0,
        seed: int = 0,
    ):
        self.samples = list(samples)
        self.latents, self.texts = latents, texts
        self.empty_text_key = empty_text_key
        self.p_drop, self.seed = caption_dropout_probability, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        epoch, i = index if isinstance(index, tuple) else (0, index)
        sample = self.samples[i]
        drop = self.p_drop > 0 and random.Random(f"{self.seed}:{epoch}:{i}").random() < self.p_drop
        item = dict(self.latents.load(sample.latent_key))
        item.update(self.texts.load(self.empty_text_key if drop else sample.text_key))
        return item


class EpochSampler(Sampler):
    """A seeded shuffle per epoch that yields ``(epoch, index)`` pairs; Lightning calls ``set_epoch``."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        for i in torch.randperm(self.length, generator=g).tolist():
            yield self.epoch, i


class FluxDataModule(L.LightningDataModule):
    """Images -> cached VAE latents and text embeddings -> training batches.

    ``prepare_data`` (once per machine) discovers images, encodes whatever the caches lack and
    releases the encoders. ``setup`` builds the dataset over the caches. ``prompts`` (validation
    prompts) are encoded into the text cache too, so text encoders are never needed afterwards.
    """

    def __init__(self, dataset: DatasetConfig, model: ModelConfig, prompts: Sequence[str] = ()):
        super().__init__()
        problems = dataset.problems()
        if problems:
            raise DataError("; ".join(problems))
        self.cfg, self.model_cfg = dataset, model
        self.prompts = list(dict.fromkeys(prompts))
        root = Path(dataset.cache_dir).expanduser()
        self.latent_cache = TensorCache(root / "vae")
        self.text_cache = TensorCache(root / "text")
        self.skipped = 0
        self._samples: list[Sample] | None = None
        self.train_dataset: CachedLatentDataset | None = None

    # -- keys ---------------------------------------------------------------------------------
    def folders(self) -> list[str]:
        if self.cfg.instance_data_dir is None:
            demo = make_demo_dataset(
                Path(self.cfg.cache_dir).expanduser() / "demo",
                count=self.cfg.demo_images,
                size=max(128, self.cfg.resolution),
                seed=self.cfg.seed,
            )
            return [str(demo)]
        return self.cfg.folders()

    def text_key(self, caption: str) -> str:
        return cache_key(
            kind="text",
            v=CACHE_VERSION,
            caption=caption,
            encoders=model_identity(self.model_cfg, "text"),
            max_length=self.model_cfg.spec.t5_max_length,
        )

    def _latent_key(self, path: Path, box) -> str:
        return cache_key(
            kind="latent",
            v=CACHE_VERSION,
            file=file_digest(path),
            resolution=self.cfg.resolution,
            box=box,
            vae=model_identity(self.model_cfg, "vae"),
        )

    def samples(self) -> list[Sample]:
        """Every usable image with its cache keys (computed once per process)."""
        if self._samples is None:
            records, skipped = discover(self.cfg, self.folders())
            samples = []
            for rec in records:
                try:
                    size = _upright_size(rec.path)
                except Exception as err:  # not an image, truncated header, ...
                    log.warning("skipping %s: cannot read image (%s)", rec.path, err)
                    skipped += 1
                    continue
                box = crop_box(size, self.cfg.resolution, self.cfg.crop_style, key=rec.path.name, seed=self.cfg.seed)
                samples.append(Sample(rec, self._latent_key(rec.path, box), self.text_key(rec.caption), box))
            self._samples, self.skipped = samples, skipped
        return self._samples

    # -- caching ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        samples = self.samples()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        todo = [s for s in samples if s.latent_key not in self.latent_cache]
        if todo:
            vae = load_vae(self.model_cfg).to(device)
            self._cache_latents(vae, todo)
            del vae
        captions = [""] + [s.record.caption for s in samples] + self.prompts
        missing = [c for c in dict.fromkeys(captions) if self.text_key(c) not in self.text_cache]
        if missing:
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            parts = load_text_encoders(self.model_cfg, dtype)
            for name in ("text_encoder", "text_encoder_2"):
                parts[name].to(device)
            self._cache_texts(parts, missing)
            del parts
        if device == "cuda":
            torch.cuda.empty_cache()

    def _cache_latents(self, vae, todo: list[Sample]) -> None:
        bs = self.cfg.vae_batch_size
        bar = tqdm(total=len(todo), desc="caching VAE latents", unit="img")
        for start in range(0, len(todo), bs):
            batch, pixels = [], []
            for s in todo[start : start + bs]:
                try:
                    pixels.append(to_pixels(load_rgb(s.record.path), self.cfg.resolution, s.box))
                    batch.append(s)
                except Exception as err:
                    log.warning("skipping %s: cannot decode image (%s)", s.record.path, err)
            if batch:
                seeds = [_seed_of(s.latent_key) for s in batch]
                latents = encode_images(vae, torch.stack(pixels), seeds)
                for s, z in zip(batch, latents):
                    self.latent_cache.save(s.latent_key, {"latents": z}, {"file": s.record.path.name})
            bar.update(len(todo[start : start + bs]))
        bar.close()

    def _cache_texts(self, parts: dict, captions: list[str]) -> None:
        bs = self.cfg.write_batch_size
        for start in tqdm(range(0, len(captions), bs), desc="caching text embeddings", unit="batch"):
            chunk = captions[start : start + bs]
            out = encode_prompts(parts, chunk, self.model_cfg.spec.t5_max_length)
            for j, caption in enumerate(chunk):
                entry = {k: v[j] for k, v in out.items()}
                self.text_cache.save(self.text_key(caption), entry, {"caption": caption[:200]})

    # -- serving ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        samples = self.samples()
        ready = [s for s in samples if s.latent_key in self.latent_cache]
        skipped = self.skipped + len(samples) - len(ready)
        if not ready:
            raise DataError(
                f"no usable images in {self.folders()} ({skipped} skipped, see warnings above); "
                "add readable images or call prepare_data() before setup()"
            )
        if skipped:
            log.warning("%d image(s) skipped; training on %d", skipped, len(ready))
        self.skipped = skipped
        self.train_dataset = CachedLatentDataset(
            ready,
            self.latent_cache,
            self.text_cache,
            self.text_key(""),
            self.cfg.caption_dropout_probability,
            self.cfg.seed,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        workers = default_num_workers() if self.cfg.num_workers is None else self.cfg.num_workers
        # pinned batches: Lightning then copies them to the GPU with non_blocking=True
        return DataLoader(
            self.train_dataset,
            batch_size=self.cfg.batch_size,
            sampler=EpochSampler(len(self.train_dataset), self.cfg.seed),
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=len(self.train_dataset) >= self.cfg.batch_size,
            persistent_workers=workers > 0,  # small datasets have short epochs: no re-fork per epoch
        )

    def prompt_embedding(self, prompt: str) -> dict[str, torch.Tensor]:
        """Cached text conditioning of one prompt (validation prompts are cached in prepare_data)."""
        key = self.text_key(prompt)
        if key not in self.text_cache:
            raise KeyError(f"prompt {prompt!r} is not in the text cache; pass it in `prompts`")
        return self.text_cache.load(key)
