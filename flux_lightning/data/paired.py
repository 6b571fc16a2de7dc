"""Paired datasets for reference-image conditioning (kontext): target image + reference image.

A pair is a training image and the image of the same relative path (any image extension) under
``conditioning_data_dir``. The reference is fitted into its image's bucket, both go through the
latent cache, and batches gain ``reference_latents`` ``(B, 16, H, W)``. With generated demo data
(``instance_data_dir: null``) the reference of each shape image is its grayscale copy, so the pair
teaches "colour this in".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..atomic_files import build_folder_once
from .buckets import fit
from .cache import cache_key, file_digest, latent_spec
from .config import DatasetConfig
from .datamodule import CACHE_VERSION, FluxDataModule, Sample
from .discovery import IMAGE_EXTENSIONS, DataError
from .transforms import upright_size

log = logging.getLogger(__name__)


@dataclass
class PairedDatasetConfig(DatasetConfig):
    """A single-folder :class:`DatasetConfig` whose images each have a reference image under the
    same relative path in ``conditioning_data_dir`` (null with demo data = generated grayscale
    references). :func:`flux_lightning.config.validate` uses it for flavours that train on pairs."""

    @classmethod
    def from_dataset(cls, dataset: DatasetConfig) -> PairedDatasetConfig:
        return cls(**{f.name: getattr(dataset, f.name) for f in fields(dataset)})

    def conditioning_folders(self) -> list[str]:
        dirs = self.conditioning_data_dir
        if dirs is None:
            return []
        return [str(dirs)] if isinstance(dirs, str) else [str(d) for d in dirs]

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.uses_shorthand():
            out.append("dataset.conditioning_data_dir (image pairs) works with the single-folder form, not dataset.backends")
        elif self.instance_data_dir is not None:
            folders = self.image_backends()[0].folders()
            if self.conditioning_data_dir is None:
                out.append(
                    "dataset.conditioning_data_dir is required with dataset.instance_data_dir; point it at "
                    "the folder of reference images (same relative file names as the training images)"
                )
            elif len(self.conditioning_folders()) != len(folders):
                out.append("dataset.conditioning_data_dir must list one folder per dataset.instance_data_dir folder")
        return out


def make_grayscale_references(folder: Path) -> Path:
    """A sibling folder with a grayscale copy of every image in ``folder`` (built once, atomically)."""

    def copy_gray(tmp: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                with Image.open(path) as im:
                    ImageOps.grayscale(im).convert("RGB").save(tmp / path.name)

    return build_folder_once(folder.parent / f"{folder.name}-reference-gray", copy_gray)


class ReferenceDataset(torch.utils.data.Dataset):
    """Adds ``reference_latents`` (read from the latent cache) to the items of a cached dataset."""

    def __init__(self, base, reference_keys: list[str]):
        self.base, self.reference_keys = base, reference_keys
        self.samples = base.samples

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        """Verified entries; a pair with a bad entry is replaced (see :class:`~flux_lightning.data.cache.StandIns`)."""
        epoch, i = index if isinstance(index, tuple) else (0, index)
        return self.base.stand_ins.serve(i, lambda j: self.item(epoch, j))

    def item(self, epoch: int, i: int) -> dict[str, torch.Tensor]:
        item = self.base.item(epoch, i)
        s = self.base.samples[i]
        cache = self.base.latent_caches[s.backend]
        item["reference_latents"] = cache.load(self.reference_keys[i], latent_spec(s.placement.bucket))["latents"]
        return item


class PairedFluxDataModule(FluxDataModule):
    """:class:`FluxDataModule` over image pairs: caches reference latents too and serves
    ``reference_latents`` with every batch. Images without a reference are skipped and counted."""

    def __init__(self, dataset: PairedDatasetConfig, model, prompts=(), **kwargs):
        super().__init__(dataset, model, prompts, **kwargs)
        self._references: dict[str, Sample] | None = None

    def image_folders(self) -> list[str]:
        return [f for b in self.backends for f in self._folders(b)]

    def conditioning_folders(self) -> list[str]:
        if self.cfg.instance_data_dir is None:
            return [str(make_grayscale_references(Path(f))) for f in self.image_folders()]
        return self.cfg.conditioning_folders()

    def reference_for(self, path: Path) -> Path | None:
        """The reference image paired with training image ``path`` (same relative path, any extension)."""
        for folder, references in zip(self.image_folders(), self.conditioning_folders()):
            try:
                relative = path.relative_to(Path(folder).expanduser())
            except ValueError:
                continue
            stem = Path(references).expanduser() / relative.with_suffix("")
            for ext in (path.suffix, *sorted(IMAGE_EXTENSIONS)):
                candidate = stem.with_suffix(ext)
                if candidate.is_file():
                    return candidate
        return None

    def samples(self) -> list[Sample]:
        if self._references is None:
            for folder in self.conditioning_folders():
                if not Path(folder).expanduser().is_dir():
                    raise DataError(
                        f"dataset.conditioning_data_dir: folder '{folder}' does not exist; "
                        "point it at the folder of reference images"
                    )
            kept, references = [], {}
            for sample in super().samples():
                ref = self.reference_for(sample.path)
                if ref is None:
                    log.warning("skipping %s: no reference image of the same name", sample.path)
                    self.skipped += 1
                    continue
                try:
                    size = upright_size(ref)
                    why = self._size_problem(size, next(b for b in self.backends if b.id == sample.backend))
                except Exception as err:  # not an image, truncated header, ...
                    why = f"cannot read image ({err})"
                if why:
                    log.warning("skipping %s: its reference %s: %s", sample.path, ref, why)
                    self.skipped += 1
                    continue
                placement = fit(size, sample.placement.bucket, "center")
                key = cache_key(kind="latent", v=CACHE_VERSION, file=file_digest(ref), placement=placement, **self._vae_identity())
                references[sample.latent_key] = replace(
                    sample, path=ref, size=size, placement=placement, latent_key=key, mask_path=None, mask_key=None
                )
                kept.append(sample)
            self._samples, self._references = kept, references
        return self._samples

    def prepare_data(self) -> None:
        super().prepare_data()
        references = self._reference_samples()
        self._discard_bad_latents(references, never_encode=set())  # references are always encoded
        todo = [r for r in references if r.latent_key not in self.latent_caches[r.backend]]
        if todo:
            from ..components import load_vae

            device = "cuda" if torch.cuda.is_available() else "cpu"
            vae = load_vae(self.model_cfg).to(device)
            self._cache_latents(vae, list({r.latent_key: r for r in todo}.values()))
            del vae

    def _reference_samples(self) -> list[Sample]:
        self.samples()
        return list(self._references.values())

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        samples = self.samples()
        paired = [s for s in samples if self._references[s.latent_key].latent_key in self.latent_caches[s.backend]]
        self.skipped += len(samples) - len(paired)
        self._samples = paired
        super().setup(stage)
        keys = [self._references[s.latent_key].latent_key for s in self.train_dataset.samples]
        self.train_dataset = ReferenceDataset(self.train_dataset, keys)
