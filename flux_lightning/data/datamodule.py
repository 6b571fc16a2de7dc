"""``FluxDataModule``: discover images per backend, fill the latent and text caches, serve bucketed batches."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import stopping
from ..components import ModelConfig, load_text_encoders, load_vae, model_identity
from .backend_file import resolve_dataset
from .buckets import Placement, place, size_metric
from .cache import (
    CacheEntryError, StandIns, TensorCache, cache_key, file_digest, latent_spec, load_many, mask_spec, text_spec,
)
from .config import DatasetConfig, ImageBackendConfig
from .demo import make_demo_dataset
from .discovery import DataError, discover, find_images
from .encoding import encode_images, encode_prompts
from .holdout import EvalDataset, split_sources
from .sampler import BucketBatchSampler, Group
from .transforms import load_mask, load_rgb, to_pixels, upright_size

log = logging.getLogger(__name__)

CACHE_VERSION = 2
MIN_SIDE = 16  # one 2x2 patch of 8x-downsampled latents: smaller images carry no usable detail


@dataclass(frozen=True)
class Sample:
    """One training image resolved to its cache entries; ``source`` is the file's content digest
    (the same for every crop, resolution and backend of one file)."""

    backend: str
    path: Path
    caption: str
    size: tuple[int, int]
    placement: Placement
    latent_key: str
    text_key: str
    mask_path: Path | None = None
    mask_key: str | None = None
    source: str = ""


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
    """Items ``{latents, prompt_embeds, pooled_prompt_embeds, attention_mask[, mask][, is_regularisation]}``.

    Indices are ``(epoch, i)`` pairs (see :class:`~flux_lightning.data.sampler.BucketBatchSampler`)
    so caption dropout is a deterministic function of ``(seed, epoch, i)``: the same in every
    worker and after a resume. ``mask`` and ``is_regularisation`` appear only for backends that
    have them, and a batch never mixes backends.
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
        item = dict(cache.load(s.latent_key, latent_spec(s.placement.bucket)))
        item.update(self.texts.load(self.empty_text_key if drop else s.text_key, self.text_spec))
        if s.mask_key is not None:
            item["mask"] = cache.load(s.mask_key, mask_spec(s.placement.bucket))["mask"]
        if s.backend in self.regularisation:
            item["is_regularisation"] = torch.tensor(True)
        return item


class FluxDataModule(L.LightningDataModule):
    """Images -> cached VAE latents and text embeddings -> bucketed training batches.

    ``prepare_data`` (once per machine) discovers images, encodes whatever the caches lack and
    releases the encoders. ``setup`` builds the dataset over the caches. ``prompts`` (validation
    prompts) are encoded into the text cache too, so text encoders are never needed afterwards.
    Every epoch draws every training image (times its repeats) in a new order (see
    :class:`~flux_lightning.data.sampler.BucketBatchSampler`). The sampler's epoch and position are
    saved in checkpoints (:meth:`state_dict`), so a resume continues with the very next batch,
    wherever the checkpoint fell (mid-epoch, on an epoch's last batch, between accumulated steps).

    Eval split (for :class:`~flux_lightning.callbacks.EvalLoss`): ``eval_fraction`` holds out a
    deterministic fraction of the *source images* (by a hash of the file's content digest, never
    trained on, labelled by their backend id) of the backends with at least ``eval_min_images``
    images; every copy of a held-out file (all crops, resolutions and backends) leaves training,
    and smaller datasets train on every image. ``eval_data_dir`` adds separate folders (label
    ``eval``), captioned and sized like the first backend. :meth:`eval_dataloader` serves them in a
    fixed order, one bucket per batch. :attr:`eval_split` describes the split in words.
    """

    def __init__(
        self,
        dataset: DatasetConfig,
        model: ModelConfig,
        prompts: Sequence[str] = (),
        eval_fraction: float = 0.0,
        eval_data_dir: str | Sequence[str] | None = None,
        eval_min_images: int = 50,
    ):
        super().__init__()
        dataset = resolve_dataset(dataset)
        problems = dataset.problems()
        if problems:
            raise DataError("; ".join(problems))
        self.cfg, self.model_cfg = dataset, model
        self.prompts = list(dict.fromkeys(prompts))
        self.root = Path(dataset.cache_dir).expanduser()
        self.backends = dataset.image_backends()
        self.text_cache = TensorCache(dataset.text_embeds.cache_dir or self.root / "text")
        self.latent_caches = {
            b.id: TensorCache(b.cache_dir_vae or self.root / "vae") for b in self.backends
        }
        self.skipped = 0
        self._samples: list[Sample] | None = None
        self.train_dataset: CachedLatentDataset | None = None
        self._sampler: BucketBatchSampler | None = None
        self._resume_state: dict | None = None
        if not 0.0 <= eval_fraction < 1.0:
            raise DataError(f"callbacks.eval_loss.eval_fraction={eval_fraction} must be within [0, 1)")
        if eval_min_images < 0:
            raise DataError(f"callbacks.eval_loss.eval_min_images={eval_min_images} must be >= 0")
        self.eval_fraction, self.eval_min_images = eval_fraction, eval_min_images
        self.eval_split = "off"
        dirs = [eval_data_dir] if isinstance(eval_data_dir, str) else list(eval_data_dir or [])
        self.eval_backend = (
            replace(self.backends[0], id="eval", instance_data_dir=[str(d) for d in dirs], repeats=0, conditioning_data=None)
            if dirs
            else None
        )
        if self.eval_backend is not None:
            self.latent_caches["eval"] = self.latent_caches[self.backends[0].id]
        self._eval_samples: list[Sample] | None = None
        self.eval_dataset: EvalDataset | None = None

    # -- keys ---------------------------------------------------------------------------------
    def _folders(self, backend: ImageBackendConfig) -> list[str]:
        if backend.instance_data_dir is None:  # the shorthand without a folder: demo data
            demo = make_demo_dataset(
                self.root / "demo", count=self.cfg.demo_images, size=max(128, int(backend.resolution)), seed=self.cfg.seed
            )
            return [str(demo)]
        return backend.folders()

    def text_key(self, caption: str) -> str:
        return cache_key(
            kind="text",
            v=CACHE_VERSION,
            caption=caption,
            encoders=model_identity(self.model_cfg, "text"),
            max_length=self.model_cfg.spec.t5_max_length,
        )

    def _vae_identity(self) -> dict:
        return {"vae": model_identity(self.model_cfg, "vae"), "vae_dtype": "float32"}

    def _mask_index(self, backend_id: str) -> dict[str, Path]:
        mask_backend = next(b for b in self.backends if b.id == backend_id)
        index = {}
        for folder in mask_backend.folders():
            root = Path(folder).expanduser()
            for p in find_images(folder, f"dataset.backends[{backend_id}].instance_data_dir"):
                index[p.relative_to(root).with_suffix("").as_posix()] = p
        return index

    def _size_problem(self, size: tuple[int, int], backend: ImageBackendConfig) -> str | None:
        """Why an image of upright ``size`` (from its header) is not used, or None.

        Checked before any pixel is decoded: ``dataset.max_image_pixels`` (decompression bombs),
        ``dataset.max_aspect_ratio`` (extreme strips, whose cover-resize would be huge), the
        backend's ``minimum_image_size`` and the shorter side of one packed latent patch (16 px).
        """
        w, h = size
        where = "dataset" if backend.id in ("default", "demo") else f"dataset.backends[{backend.id}]"
        if w * h > self.cfg.max_image_pixels:
            return f"{w}x{h} exceeds dataset.max_image_pixels={self.cfg.max_image_pixels} (decompression-bomb guard)"
        if max(w, h) > self.cfg.max_aspect_ratio * min(w, h):
            return (
                f"{w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.3g}:1, beyond "
                f"dataset.max_aspect_ratio={self.cfg.max_aspect_ratio:g} (crop it, or raise the limit)"
            )
        if backend.minimum_image_size and size_metric(size, backend.resolution_type) < backend.minimum_image_size:
            unit = {"pixel": "shorter side", "area": "megapixels", "pixel_area": "sqrt(area)"}[backend.resolution_type]
            return (
                f"{w}x{h} is below {where}.minimum_image_size={backend.minimum_image_size:g} ({unit}); "
                "it would be upscaled into a blur"
            )
        if min(w, h) < MIN_SIDE:
            return f"{w}x{h} is smaller than one {MIN_SIDE}x{MIN_SIDE} latent patch"
        return None

    def _resolve(self, backend: ImageBackendConfig) -> tuple[list[Sample], int]:
        records, skipped = discover(backend, self._folders(backend))
        masks = self._mask_index(backend.conditioning_data) if backend.conditioning_data else None
        samples = []
        for rec in records:
            try:
                size = upright_size(rec.path)
            except Exception as err:  # not an image, truncated header, symlink loop, ...
                log.warning("skipping %s: cannot read image (%s)", rec.path, err)
                skipped += 1
                continue
            why = self._size_problem(size, backend)
            if why:
                log.warning("skipping %s: %s", rec.path, why)
                skipped += 1
                continue
            placement = place(size, backend, key=rec.relative, seed=self.cfg.seed)
            digest = file_digest(rec.path)
            latent_key = cache_key(kind="latent", v=CACHE_VERSION, file=digest, placement=placement, **self._vae_identity())
            mask_path = mask_key = None
            if masks is not None:
                mask_path = masks.get(Path(rec.relative).with_suffix("").as_posix())
                if mask_path is None:
                    log.warning("skipping %s: backend %r has no mask with this name", rec.path, backend.conditioning_data)
                    skipped += 1
                    continue
                try:
                    mask_size = upright_size(mask_path)
                except Exception as err:
                    mask_size, why = None, f"cannot read its mask {mask_path} ({err})"
                if mask_size and mask_size[0] * mask_size[1] > self.cfg.max_image_pixels:
                    why = f"its mask {mask_path} exceeds dataset.max_image_pixels={self.cfg.max_image_pixels}"
                elif mask_size:
                    why = None
                if why:
                    log.warning("skipping %s: %s", rec.path, why)
                    skipped += 1
                    continue
                mask_key = cache_key(kind="mask", v=CACHE_VERSION, file=file_digest(mask_path), size=size, placement=placement)
            samples.append(
                Sample(
                    backend.id, rec.path, rec.caption, size, placement, latent_key, self.text_key(rec.caption),
                    mask_path, mask_key, source=digest,
                )
            )
        return samples, skipped

    def samples(self) -> list[Sample]:
        """Every usable image of every trained backend with its cache keys (computed once per process)."""
        if self._samples is None:
            samples, skipped = [], 0
            for backend in self.backends:
                if backend.dataset_type == "image":
                    found, n = self._resolve(backend)
                    samples += found
                    skipped += n
            self._samples, self.skipped = samples, skipped
        return self._samples

    def eval_folder_samples(self) -> list[Sample]:
        """Images of ``eval_data_dir`` (computed once per process)."""
        if self._eval_samples is None:
            if self.eval_backend is None:
                self._eval_samples = []
            else:
                for d in self.eval_backend.folders():
                    if not Path(d).expanduser().is_dir():
                        raise DataError(
                            f"callbacks.eval_loss.eval_data_dir: folder '{d}' does not exist; point it at a folder of images"
                        )
                self._eval_samples, _ = self._resolve(self.eval_backend)
        return self._eval_samples

    # -- caching ------------------------------------------------------------------------------
    def wanted_prompts(self) -> list[str]:
        """``prompts`` plus every text the trainer's callbacks need embedded (their ``prompt_texts()``,
        e.g. the validation prompts), so no text encoder is needed after caching."""
        callbacks = getattr(self.trainer, "callbacks", None) or []
        asked = [p for cb in callbacks if hasattr(cb, "prompt_texts") for p in cb.prompt_texts()]
        return list(dict.fromkeys([*self.prompts, *asked]))

    def summary_rows(self) -> list[tuple[str, object]]:
        """Rows of the end-of-run table: the eval split and the images that could not be used."""
        return [("eval split", self.eval_split), ("images skipped", self.skipped)]

    def prepare_data(self) -> None:
        """Encode what the caches lack. Existing entries are verified first (:meth:`_discard_bad`):
        a truncated, empty, NaN, misshapen or mislabelled entry is reported by file name and counts
        as missing, so it is encoded again from its image, mask or caption."""
        samples = self.samples() + self.eval_folder_samples()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        never_encode = self._never_encode()
        self._discard_bad_latents(samples)
        todo = [
            s for s in samples
            if s.backend not in never_encode and s.latent_key not in self.latent_caches[s.backend]
        ]
        if todo:
            vae = load_vae(self.model_cfg).to(device)
            self._cache_latents(vae, todo)
            del vae
        self._discard_bad_masks(samples)
        for s in samples:
            cache = self.latent_caches[s.backend]
            if s.mask_key is not None and s.mask_key not in cache:
                try:
                    mask = load_mask(s.mask_path, s.size, s.placement)
                except Exception as err:
                    log.warning("skipping %s: cannot read its mask %s (%s)", s.path, s.mask_path, err)
                    continue
                cache.save(s.mask_key, {"mask": mask}, {"file": s.mask_path.name})
        captions = list(dict.fromkeys([""] + [s.caption for s in samples] + self.wanted_prompts()))
        self._discard_bad_texts(captions)
        missing = [c for c in captions if self.text_key(c) not in self.text_cache]
        if missing:
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            parts = load_text_encoders(self.model_cfg, dtype)
            for name in ("text_encoder", "text_encoder_2"):
                parts[name].to(device)
            self._cache_texts(parts, missing)
            del parts
        if device == "cuda":
            torch.cuda.empty_cache()

    def _never_encode(self) -> set[str]:
        return {b.id for b in self.backends if "vae" in str(b.skip_file_discovery).split()}

    def _discard_bad(self, entries: list[tuple[TensorCache, str, object, str]]) -> list[dict | None]:
        """Verify the existing entries of ``(cache, key, spec, remedy)`` (:func:`load_many`): a bad
        one is reported once, by file name, with ``remedy``, and removed, so it counts as missing and
        is encoded again. Returns the tensors of each good entry, None for bad or absent ones."""
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

    def _discard_bad_latents(self, samples: Sequence[Sample], never_encode: set[str] | None = None) -> None:
        """Check the latent entries of ``samples`` (each file once), see :meth:`_discard_bad`;
        ``never_encode``: backends whose entries are not re-encoded (default: ``skip_file_discovery=vae``)."""
        never_encode = self._never_encode() if never_encode is None else never_encode
        entries = {}
        for s in samples:
            cache = self.latent_caches[s.backend]
            remedy = (
                f"backend {s.backend!r} has skip_file_discovery=vae, so it is not re-encoded and {s.path} is skipped"
                if s.backend in never_encode else f"re-encoding it from {s.path}"
            )
            entries.setdefault(cache.path(s.latent_key), (cache, s.latent_key, latent_spec(s.placement.bucket), remedy))
        self._discard_bad(list(entries.values()))

    def _discard_bad_masks(self, samples: Sequence[Sample]) -> None:
        """Check the mask entries of ``samples``, see :meth:`_discard_bad`."""
        entries = {
            self.latent_caches[s.backend].path(s.mask_key): (
                self.latent_caches[s.backend], s.mask_key, mask_spec(s.placement.bucket), f"re-encoding it from {s.mask_path}"
            )
            for s in samples if s.mask_key is not None
        }
        self._discard_bad(list(entries.values()))

    def _discard_bad_texts(self, captions: Sequence[str]) -> None:
        """Check the text entries of ``captions`` (see :meth:`_discard_bad`); every entry must also
        have the embedding widths ``(D_t5, D_clip)`` most entries have."""
        spec = text_spec(self.model_cfg.spec.t5_max_length)
        keys = [self.text_key(c) for c in captions]
        entries = [(self.text_cache, k, spec, f"re-encoding caption {c[:60]!r}") for k, c in zip(keys, captions)]
        widths = {
            key: ((entry["prompt_embeds"].shape[1], entry["pooled_prompt_embeds"].shape[0]), caption)
            for key, caption, entry in zip(keys, captions, self._discard_bad(entries)) if entry is not None
        }
        if len({w for w, _ in widths.values()}) > 1:
            common = Counter(w for w, _ in widths.values()).most_common(1)[0][0]
            for key, (w, caption) in widths.items():
                if w != common:
                    path = self.text_cache.path(key)
                    log.warning(
                        "cache entry %s is corrupt (embedding widths %s, the other entries have %s); "
                        "re-encoding caption %r", path, w, common, caption[:60],
                    )
                    path.unlink(missing_ok=True)

    def _cache_latents(self, vae, todo: list[Sample]) -> None:
        by_bucket: dict[tuple[int, int], list[Sample]] = defaultdict(list)
        for s in todo:
            by_bucket[s.placement.bucket].append(s)
        bs = self.cfg.vae_batch_size
        bar = tqdm(total=len(todo), desc="caching VAE latents", unit="img")
        for group in by_bucket.values():
            for start in range(0, len(group), bs):
                stopping.check()  # SIGTERM/SIGINT: stop between batches (every entry is written atomically)
                chunk = group[start : start + bs]
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
                        self.latent_caches[s.backend].save(s.latent_key, {"latents": z}, {"file": s.path.name})
                bar.update(len(chunk))
        bar.close()

    def _cache_texts(self, parts: dict, captions: list[str]) -> None:
        bs = self.cfg.text_embeds.write_batch_size
        for start in tqdm(range(0, len(captions), bs), desc="caching text embeddings", unit="batch"):
            stopping.check()
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
        ready = [s for s in samples if self._cached(s)]
        skipped = self.skipped + len(samples) - len(ready)
        if not ready:
            raise DataError(
                f"no usable images in backends {[b.id for b in self.backends]} ({skipped} skipped, see "
                "warnings above); add readable images or call prepare_data() before setup()"
            )
        if skipped:
            log.warning("%d image(s) skipped; training on %d", skipped, len(ready))
        self.skipped = skipped
        held = self._split(ready)
        ready = [s for s in ready if s.source not in held]
        self._setup_eval(held)
        default_p = self.cfg.caption_dropout_probability
        self.train_dataset = CachedLatentDataset(
            ready,
            self.latent_caches,
            self.text_cache,
            self.text_key(""),
            dropout={
                b.id: default_p if b.caption_dropout_probability is None else b.caption_dropout_probability
                for b in self.backends
            },
            regularisation={b.id for b in self.backends if b.is_regularisation_data},
            seed=self.cfg.seed,
            t5_length=self.model_cfg.spec.t5_max_length,
        )

    def _cached(self, s: Sample) -> bool:
        cache = self.latent_caches[s.backend]
        return s.latent_key in cache and (s.mask_key is None or s.mask_key in cache)

    def _split(self, ready: list[Sample]) -> set[str]:
        """Sources held out of training (see :func:`~flux_lightning.data.holdout.split_sources`);
        sets :attr:`eval_split`."""
        by_backend: dict[str, set[str]] = defaultdict(set)
        for s in ready:
            by_backend[s.backend].add(s.source)
        held, large = split_sources(by_backend, self.eval_fraction, self.eval_min_images)
        total = len(set().union(*by_backend.values()))
        parts = []
        if held:
            parts.append(f"{len(held)} images held out of {total} (backends {', '.join(large)})")
            log.info("eval split: %s", parts[0])
        elif self.eval_fraction > 0:
            why = (
                f"no backend has >= {self.eval_min_images} images" if not large
                else f"every image of {', '.join(large)} is also in a smaller backend"
            )
            parts.append(f"off ({why})")
            (log.info if self.eval_backend is not None else log.warning)(
                "eval split off: %s (callbacks.eval_loss.eval_min_images), so all %d images train; set "
                "callbacks.eval_loss.eval_data_dir=<folder> to evaluate on separate images", why, total,
            )
        if self.eval_backend is not None:
            parts.append(f"eval_data_dir: {len(self.eval_folder_samples())} images")
        self.eval_split = ", ".join(parts) or "off"
        return held

    def _setup_eval(self, held: set[str]) -> None:
        chosen = list({
            s.latent_key: s for s in self.samples()
            if s.source in held and s.latent_key in self.latent_caches[s.backend]
        }.values())
        chosen += [s for s in self.eval_folder_samples() if s.latent_key in self.latent_caches[s.backend]]
        self.eval_dataset = (
            EvalDataset(chosen, self.latent_caches, self.text_cache, text_spec(self.model_cfg.spec.t5_max_length))
            if chosen else None
        )

    def eval_dataloader(self, batch_size: int | None = None) -> DataLoader | None:
        """The eval split in a fixed order, one backend and bucket per batch (None when empty)."""
        if self.eval_dataset is None:
            return None
        bs = batch_size or self.cfg.batch_size
        groups: dict[tuple[str, tuple[int, int]], list[int]] = defaultdict(list)
        for i, s in enumerate(self.eval_dataset.samples):
            groups[(s.backend, s.placement.bucket)].append(i)
        batches = [idx[j : j + bs] for _, idx in sorted(groups.items()) for j in range(0, len(idx), bs)]
        return DataLoader(self.eval_dataset, batch_sampler=batches, num_workers=0)

    def groups(self, world_size: int = 1) -> list[Group]:
        """One group per (backend, bucket), indices repeated ``repeats + 1`` times; checks sizes."""
        assert self.train_dataset is not None, "call setup() first"
        by_key: dict[tuple[str, tuple[int, int]], list[int]] = defaultdict(list)
        for i, s in enumerate(self.train_dataset.samples):
            by_key[(s.backend, s.placement.bucket)].append(i)
        backends = {b.id: b for b in self.backends}
        global_batch = self.cfg.batch_size * world_size
        groups, usable = [], defaultdict(int)
        for (bid, bucket), idx in sorted(by_key.items()):
            b = backends[bid]
            repeated = tuple(idx * (b.repeats + 1))
            if len(repeated) < global_batch:
                log.warning(
                    "backend %r: bucket %dx%d has %d sample(s) with repeats, fewer than one batch of %d; "
                    "they are not used (raise dataset.backends[%s].repeats)",
                    bid, *bucket, len(repeated), global_batch, bid,
                )
            usable[bid] += len(repeated) // global_batch
            groups.append(Group(bid, bucket, repeated, b.probability))
        for bid in sorted({s.backend for s in self.train_dataset.samples}):
            if usable[bid] == 0:
                name = "dataset" if bid in ("default", "demo") else f"dataset.backends[{bid}]"
                raise DataError(
                    f"no images detected in backend {bid!r}: too few images to fill one batch of "
                    f"{global_batch} (batch_size x devices) in any aspect bucket; raise {name}.repeats "
                    "or lower dataset.batch_size"
                )
        return groups

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self._sampler = BucketBatchSampler(
            self.groups(world), self.cfg.batch_size, seed=self.cfg.seed, rank=rank, world_size=world
        )
        if self._resume_state is not None:
            self._sampler.load_state_dict(self._resume_state)
            self._resume_state = None
        workers = default_num_workers() if self.cfg.num_workers is None else self.cfg.num_workers
        # pinned batches: Lightning then copies them to the GPU with non_blocking=True
        return DataLoader(
            self.train_dataset,
            batch_sampler=self._sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,  # epochs are keyed in the sampler's indices, not the workers
            # its own generator: creating an iterator must not consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    # -- resumable position -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """The sampler's epoch and the number of batches of it already trained on."""
        if self._sampler is None or self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"sampler": self._sampler.state_dict(position=done)}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" in state:
            self._resume_state = state["sampler"]
            if self._sampler is not None:
                self._sampler.load_state_dict(self._resume_state)

    def prompt_embedding(self, prompt: str) -> dict[str, torch.Tensor]:
        """Cached text conditioning of one prompt (validation prompts are cached in prepare_data)."""
        key = self.text_key(prompt)
        if key not in self.text_cache:
            raise KeyError(f"prompt {prompt!r} is not in the text cache; pass it in `prompts`")
        return self.text_cache.load(key, text_spec(self.model_cfg.spec.t5_max_length))
