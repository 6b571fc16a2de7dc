"""``FluxDataModule``: discover images per backend, fill the latent and text caches, serve bucketed batches.

The pieces live beside it: sample resolution (sizes, buckets, keys, masks, references) in
:mod:`.resolve`, cache verification and encoding in :mod:`.caching`, the datasets in :mod:`.datasets`
and :mod:`.holdout` (eval split), reference images (kontext pairs) in :mod:`.references`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..model.components import load_text_encoders, load_vae, model_identity, resolve_source
from ..model.config import ModelConfig
from ..training.hooks import EvalSplit, PromptTexts, SummaryRows
from . import caching
from .backend_file import resolve_dataset
from .cache import TensorCache, cache_key, text_spec
from .config import DatasetConfig, ImageBackendConfig
from .datasets import CachedLatentDataset, default_num_workers
from .demo import make_demo_dataset
from .discovery import DataError
from .holdout import EvalDataset, split_sources
from .ranks import CacheGroup, caching_workers, share
from .references import make_grayscale_references, pairing_problems, with_demo_references
from .resolve import CACHE_VERSION, MIN_SIDE, Sample, SampleResolver
from .sampler import BucketBatchSampler, Group

__all__ = ["CACHE_VERSION", "MIN_SIDE", "CachedLatentDataset", "FluxDataModule", "Sample", "default_num_workers"]

log = logging.getLogger(__name__)


@dataclass
class CachePlan:
    """What one rank found (:meth:`FluxDataModule.plan_caching`) and every rank encodes a share of:
    the samples, the missing latents and texts as chunks (one encoder call each), the missing masks."""

    samples: list[Sample]
    eval_samples: list[Sample]
    skipped: int
    latents: list[list[Sample]]
    masks: list[Sample]
    texts: list[list[str]]


class FluxDataModule(L.LightningDataModule):
    """Images -> cached VAE latents and text embeddings -> bucketed training batches.

    ``prepare_data`` (once per machine) discovers images, encodes whatever the caches lack and
    releases the encoders. ``setup`` builds the dataset over the caches. ``prompts`` (validation
    prompts) are encoded into the text cache too, so text encoders are never needed afterwards.
    Every epoch draws every training image (times its repeats) in a new order (see
    :class:`~flux_lightning.data.sampler.BucketBatchSampler`). The sampler's epoch and position are
    saved in checkpoints (:meth:`state_dict`), so a resume continues with the very next batch,
    wherever the checkpoint fell (mid-epoch, on an epoch's last batch, between accumulated steps).

    Pairs (kontext): an image backend linked by ``conditioning_data`` to a ``conditioning_type:
    reference`` backend trains on pairs; each item then has ``reference_latents`` (see
    :mod:`.references`). A model whose flavour trains on pairs needs them on every image backend
    (with the generated demo data, grayscale copies are made), and other flavours refuse them.

    Eval split (for :class:`~flux_lightning.callbacks.EvalLoss`), from ``dataset.eval_*``:
    ``eval_fraction`` holds out a deterministic fraction of the *source images* (by a hash of the
    file's content digest, never trained on, labelled by their backend id) of the backends with at
    least ``eval_min_images`` images; every copy of a held-out file (all crops, resolutions and
    backends) leaves training, and smaller datasets train on every image. ``eval_data_dir`` adds
    separate folders (label ``eval``), captioned and sized like the first image backend.
    :meth:`eval_dataloader` serves them in a fixed order, one bucket per batch. :attr:`eval_split`
    describes the split in words.
    """

    implements = (SummaryRows, EvalSplit)  # hooks.py; tests/callbacks/test_hooks.py checks them

    def __init__(self, dataset: DatasetConfig, model: ModelConfig, prompts: Sequence[str] = ()):
        super().__init__()
        dataset = resolve_dataset(dataset)
        pairs = model.spec.reference_conditioning
        problems = dataset.problems() + pairing_problems(dataset, pairs, model.spec.mimics or model.spec.name)
        if problems:
            raise DataError("; ".join(problems))
        self.cfg, self.model_cfg = dataset, model
        self.prompts = list(dict.fromkeys(prompts))
        self.root = Path(dataset.cache_dir).expanduser()
        self.backends = with_demo_references(dataset.image_backends()) if pairs else dataset.image_backends()
        self.text_cache = TensorCache(dataset.text_embeds.cache_dir or self.root / "text")
        self.latent_caches = {b.id: TensorCache(b.cache_dir_vae or self.root / "vae") for b in self.backends}
        self.resolver = SampleResolver(
            dataset,
            self.backends,
            self._folders,
            self.text_key,
            {"vae": model_identity(model, "vae"), "vae_dtype": "float32"},
        )
        self.skipped = 0
        self.encoded: list[str] = []  # cache keys this process wrote (latents and texts)
        self._filled = False
        self._samples: list[Sample] | None = None
        self.train_dataset: CachedLatentDataset | None = None
        self._sampler: BucketBatchSampler | None = None
        self._resume_state: dict | None = None
        self.eval_split = "off"
        first = next(b for b in self.backends if b.dataset_type == "image")
        dirs = dataset.eval_folders()
        self.eval_backend = (
            replace(
                first,
                id="eval",
                instance_data_dir=dirs,
                repeats=0,
                conditioning_data=None,
                type="local",
                dataset_name=None,
                mask_column=None,
                caption_strategy="filename" if first.caption_strategy == "huggingface" else first.caption_strategy,
            )
            if dirs
            else None
        )
        if self.eval_backend is not None:
            self.latent_caches["eval"] = self.latent_caches[first.id]
        self._eval_samples: list[Sample] | None = None
        self.eval_dataset: EvalDataset | None = None

    # -- keys and samples ---------------------------------------------------------------------
    def _folders(self, backend: ImageBackendConfig) -> list[str]:
        """The backend's folders; without one (the shorthand's demo), the generated demo images, or
        for a reference backend their grayscale copies."""
        if backend.instance_data_dir is None:
            demo = make_demo_dataset(
                self.root / "demo",
                count=self.cfg.demo_images,
                size=max(128, int(backend.resolution)),
                seed=self.cfg.seed,
            )
            return [str(make_grayscale_references(demo) if backend.dataset_type == "conditioning" else demo)]
        return backend.folders()

    def text_key(self, caption: str) -> str:
        return cache_key(
            kind="text",
            v=CACHE_VERSION,
            caption=caption,
            encoders=model_identity(self.model_cfg, "text"),
            max_length=self.model_cfg.spec.t5_max_length,
        )

    def samples(self) -> list[Sample]:
        """Every usable image of every trained backend with its cache keys (computed once per process)."""
        if self._samples is None:
            samples, skipped = [], 0
            for backend in self.backends:
                if backend.dataset_type == "image":
                    found, n = self.resolver.resolve(backend)
                    samples += found
                    skipped += len(n)
            self._samples, self.skipped = samples, skipped
        return self._samples

    def eval_folder_samples(self) -> list[Sample]:
        """Images of ``dataset.eval_data_dir`` (computed once per process)."""
        if self._eval_samples is None:
            if self.eval_backend is None:
                self._eval_samples = []
            else:
                for d in self.eval_backend.folders():
                    if not Path(d).expanduser().is_dir():
                        raise DataError(
                            f"dataset.eval_data_dir: folder '{d}' does not exist; point it at a folder of images"
                        )
                self._eval_samples, _ = self.resolver.resolve(self.eval_backend)
        return self._eval_samples

    # -- caching ------------------------------------------------------------------------------
    def wanted_prompts(self) -> list[str]:
        """``prompts`` plus every text the trainer's callbacks need embedded (their ``prompt_texts()``,
        e.g. the validation prompts), so no text encoder is needed after caching."""
        callbacks = getattr(self.trainer, "callbacks", None) or []
        asked = [p for cb in callbacks if isinstance(cb, PromptTexts) for p in cb.prompt_texts()]
        return list(dict.fromkeys([*self.prompts, *asked]))

    def summary_rows(self) -> list[tuple[str, object]]:
        """Rows of the end-of-run table: the eval split and the images that could not be used."""
        return [("eval split", self.eval_split), ("images skipped", self.skipped)]

    def prepare_data(self) -> None:
        """Encode what the caches lack, with one VAE load for images and references. Existing
        entries are verified first (:func:`.caching.discard_bad`): a truncated, empty, NaN,
        misshapen or mislabelled entry is reported by file name and counts as missing, so it is
        encoded again from its image, reference, mask or caption.

        Under a trainer with several processes this does nothing (Lightning calls it on one rank
        only): :meth:`setup` caches on every rank instead, each encoding its share (:mod:`.ranks`)."""
        if self._ranks() > 1:
            return
        self._fill_caches(CacheGroup())

    def _ranks(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def plan_caching(self) -> CachePlan:
        """Discover every image, verify the existing entries and list what is missing, in chunks
        that do not depend on the number of ranks (done by one rank per cache, see :mod:`.ranks`)."""
        samples, evals = self.samples(), self.eval_folder_samples()
        everything = samples + evals
        images = everything + [s.reference for s in everything if s.reference is not None]
        never_encode = self._never_encode()
        caching.discard_bad_latents(images, self.latent_caches, never_encode)
        todo = {
            self.latent_caches[s.backend].path(s.latent_key): s
            for s in images
            if s.backend not in never_encode and s.latent_key not in self.latent_caches[s.backend]
        }
        caching.discard_bad_masks(everything, self.latent_caches)
        captions = list(dict.fromkeys([""] + [s.caption for s in everything] + self.wanted_prompts()))
        caching.discard_bad_texts(
            captions, self.text_cache, self.text_key, text_spec(self.model_cfg.spec.t5_max_length)
        )
        missing = [c for c in captions if self.text_key(c) not in self.text_cache]
        if todo or missing:  # a model folder built on demand (tiny flavour): once, before the ranks load it
            resolve_source(self.model_cfg)
        return CachePlan(
            samples,
            evals,
            self.skipped,
            caching.latent_chunks(list(todo.values()), self.cfg.vae_batch_size),
            caching.missing_masks(everything, self.latent_caches),
            caching.text_chunks(missing, self.cfg.text_embeds.write_batch_size),
        )

    def _fill_caches(self, group: CacheGroup) -> None:
        """The leader plans (:meth:`plan_caching`) and publishes the plan; every member encodes its
        share of it, then waits for the others (no timeout; a stop signal still stops it)."""
        if self._filled:
            return
        try:
            if group.leader:
                plan = self.plan_caching()
                group.publish(plan)
            else:
                plan = group.receive()
                self._samples, self._eval_samples, self.skipped = plan.samples, plan.eval_samples, plan.skipped
            self._encode(plan, group)
        except BaseException as err:
            group.fail(err)
            raise
        group.done()
        self._filled = True

    def _encode(self, plan: CachePlan, group: CacheGroup) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        chunks = share(plan.latents, group)
        if chunks:
            vae = load_vae(self.model_cfg).to(device)
            local_ranks = self.trainer.world_size // self.trainer.num_nodes if self._ranks() > 1 else 1
            workers = caching_workers(self.cfg.num_workers, local_ranks)
            self.encoded += caching.cache_latents(vae, chunks, self.latent_caches, workers)
            del vae
        caching.cache_masks(share(plan.masks, group), self.latent_caches)
        chunks = share(plan.texts, group)
        if chunks:
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            parts = load_text_encoders(self.model_cfg, dtype)
            for name in ("text_encoder", "text_encoder_2"):
                parts[name].to(device)
            t5_length = self.model_cfg.spec.t5_max_length
            self.encoded += caching.cache_texts(parts, chunks, self.text_cache, self.text_key, t5_length)
            del parts
        if device == "cuda":
            torch.cuda.empty_cache()

    def _never_encode(self) -> set[str]:
        return {b.id for b in self.backends if "vae" in str(b.skip_file_discovery).split()}

    # -- serving ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if self._ranks() > 1 and not self._filled:  # every rank caches its share (see prepare_data)
            group = CacheGroup.of(self.trainer, self.prepare_data_per_node, self.root)
            self._fill_caches(group)
            self.trainer.strategy.barrier("flux_lightning caching")  # all passed done(): quick
            group.cleanup()
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
        return (
            s.latent_key in cache
            and (s.mask_key is None or s.mask_key in cache)
            and (s.reference is None or s.reference.latent_key in self.latent_caches[s.reference.backend])
        )

    def _split(self, ready: list[Sample]) -> set[str]:
        """Sources held out of training (see :func:`~flux_lightning.data.holdout.split_sources`);
        sets :attr:`eval_split`."""
        by_backend: dict[str, set[str]] = defaultdict(set)
        for s in ready:
            by_backend[s.backend].add(s.source)
        fraction, min_images = self.cfg.eval_fraction, self.cfg.eval_min_images
        held, large = split_sources(by_backend, fraction, min_images)
        total = len(set().union(*by_backend.values()))
        parts = []
        if held:
            parts.append(f"{len(held)} images held out of {total} (backends {', '.join(large)})")
            log.info("eval split: %s", parts[0])
        elif fraction > 0:
            why = (
                f"no backend has >= {min_images} images"
                if not large
                else f"every image of {', '.join(large)} is also in a smaller backend"
            )
            parts.append(f"off ({why})")
            log.info(  # the eval-loss callback warns when it finds no split
                "eval split off: %s (dataset.eval_min_images), so all %d images train; set "
                "dataset.eval_data_dir=<folder> to evaluate on separate images",
                why,
                total,
            )
        if self.eval_backend is not None:
            parts.append(f"eval_data_dir: {len(self.eval_folder_samples())} images")
        self.eval_split = ", ".join(parts) or "off"
        return held

    def _setup_eval(self, held: set[str]) -> None:
        chosen = list(
            {
                s.latent_key: s
                for s in self.samples()
                if s.source in held and s.latent_key in self.latent_caches[s.backend]
            }.values()
        )
        chosen += [s for s in self.eval_folder_samples() if s.latent_key in self.latent_caches[s.backend]]
        self.eval_dataset = (
            EvalDataset(chosen, self.latent_caches, self.text_cache, text_spec(self.model_cfg.spec.t5_max_length))
            if chosen
            else None
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
                    bid,
                    *bucket,
                    len(repeated),
                    global_batch,
                    bid,
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
