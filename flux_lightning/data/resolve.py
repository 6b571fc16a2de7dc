"""Sample resolution: each image of a backend -> a :class:`Sample` (size checked from the file's
header, bucket and crop, cache keys, and the mask or reference image its conditioning backend holds)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from .buckets import Placement, fit, place, size_metric
from .cache import cache_key, file_digest
from .config import DatasetConfig, ImageBackendConfig, backend_field
from .discovery import Skip, discover, find_images, skip
from .huggingface import discover_rows
from .transforms import upright_size

log = logging.getLogger(__name__)

CACHE_VERSION = 2
MIN_SIDE = 16  # one 2x2 patch of 8x-downsampled latents: smaller images carry no usable detail


@dataclass(frozen=True)
class Sample:
    """One training image resolved to its cache entries; ``source`` is the file's content digest
    (the same for every crop, resolution and backend of one file). ``reference``: its reference
    image (kontext pairs) as a sample of the reference backend, placed in this sample's bucket.
    ``mask_alpha``: the mask is the alpha channel of ``mask_path`` (the image itself,
    ``mask_from_alpha``). ``path``/``mask_path`` are a
    :class:`~flux_lightning.data.huggingface.RowImage` for ``type: huggingface`` backends."""

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
    reference: Sample | None = None
    mask_alpha: bool = False


class ConditioningIndex:
    """The files of a conditioning backend by relative path without extension.

    Folder i of the image backend pairs with folder i of the conditioning backend when both list as
    many folders; otherwise every folder of the conditioning backend is searched (first match). A
    file with the image's own extension is preferred, then the first in sorted order.
    """

    def __init__(self, folders: list[str], image_folders: int, field: str):
        self.paired = len(folders) == image_folders
        self.files: list[dict[str, list[Path]]] = []
        for folder in folders:
            root, index = Path(folder).expanduser(), defaultdict(list)
            for p in find_images(folder, field):
                index[p.relative_to(root).with_suffix("").as_posix()].append(p)
            self.files.append(index)

    def find(self, folder: int, relative: str) -> Path | None:
        stem, suffix = Path(relative).with_suffix("").as_posix(), Path(relative).suffix
        for index in [self.files[folder]] if self.paired else self.files:
            found = index.get(stem)
            if found:
                return next((p for p in found if p.suffix == suffix), found[0])
        return None


class SampleResolver:
    """Resolves the images of a backend (see :meth:`resolve`) with the dataset's limits.

    Args:
        cfg: the dataset (limits, seed).
        backends: every enabled backend (conditioning ones are looked up by id).
        folders: ``backend -> its folders`` (the datamodule generates the demo data there).
        text_key: ``caption -> text cache key``.
        vae_identity: the VAE part of every latent cache key.
        cache_version: part of every cache key.
    """

    def __init__(
        self,
        cfg: DatasetConfig,
        backends: list[ImageBackendConfig],
        folders: Callable[[ImageBackendConfig], list[str]],
        text_key: Callable[[str], str],
        vae_identity: dict,
    ):
        self.cfg, self.by_id = cfg, {b.id: b for b in backends}
        self.folders, self.text_key, self.vae_identity = folders, text_key, vae_identity

    def latent_key(self, digest: str, placement: Placement) -> str:
        return cache_key(kind="latent", v=CACHE_VERSION, file=digest, placement=placement, **self.vae_identity)

    def size_problem(self, size: tuple[int, int], backend: ImageBackendConfig) -> str | None:
        """Why an image of upright ``size`` (from its header) is not used, or None.

        Checked before any pixel is decoded: ``dataset.max_image_pixels`` (decompression bombs),
        ``dataset.max_aspect_ratio`` (extreme strips, whose cover-resize would be huge), the
        backend's ``minimum_image_size`` and the shorter side of one packed latent patch (16 px).
        """
        w, h = size
        cfg = self.cfg
        if w * h > cfg.max_image_pixels:
            return f"{w}x{h} exceeds dataset.max_image_pixels={cfg.max_image_pixels} (decompression-bomb guard)"
        if max(w, h) > cfg.max_aspect_ratio * min(w, h):
            return (
                f"{w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.3g}:1, beyond "
                f"dataset.max_aspect_ratio={cfg.max_aspect_ratio:g} (crop it, or raise the limit)"
            )
        if backend.minimum_image_size and size_metric(size, backend.resolution_type) < backend.minimum_image_size:
            unit = {"pixel": "shorter side", "area": "megapixels", "pixel_area": "sqrt(area)"}[backend.resolution_type]
            return (
                f"{w}x{h} is below {backend_field(backend.id, 'minimum_image_size')}={backend.minimum_image_size:g} "
                f"({unit}); it would be upscaled into a blur"
            )
        if min(w, h) < MIN_SIDE:
            return f"{w}x{h} is smaller than one {MIN_SIDE}x{MIN_SIDE} latent patch"
        return None

    def resolve(self, backend: ImageBackendConfig) -> tuple[list[Sample], list[Skip]]:
        """Usable images of ``backend`` and the images skipped, with the reason (each also logged)."""
        if backend.type == "huggingface":
            folders = []
            records, skips = discover_rows(backend, Path(self.cfg.cache_dir).expanduser() / "huggingface")
        else:
            folders = self.folders(backend)
            records, skips = discover(backend, folders)
        link = self.by_id.get(backend.conditioning_data) if backend.conditioning_data else None
        index = None
        if link is not None:
            field = backend_field(link.id, "instance_data_dir")
            index = ConditioningIndex(self.folders(link), len(folders), field)
        samples = []
        bar = tqdm(records, desc=f"reading images of {backend.id!r} (size, hash)", unit="img", disable=len(records) < 2)
        for rec in bar:
            try:
                size = upright_size(rec.path)
            except Exception as err:  # not an image, truncated header, symlink loop, ...
                skip(skips, rec.path, f"cannot read image ({err})")
                continue
            why = self.size_problem(size, backend)
            if why:
                skip(skips, rec.path, why)
                continue
            placement = place(size, backend, key=rec.relative, seed=self.cfg.seed)
            digest = file_digest(rec.path)
            sample = Sample(
                backend.id,
                rec.path,
                rec.caption,
                size,
                placement,
                self.latent_key(digest, placement),
                self.text_key(rec.caption),
                source=digest,
            )
            why = None
            if rec.mask is not None:  # a huggingface backend's mask_column
                sample, why = self._with_mask(sample, rec.mask, backend, None)
            elif backend.mask_from_alpha:
                sample = self._with_alpha_mask(sample)
            if why:
                skip(skips, rec.path, why)
                continue
            if link is not None:
                found = index.find(rec.folder, rec.relative)
                if found is None:
                    skip(
                        skips, rec.path,
                        f"backend {link.id!r} has no {link.conditioning_type} of the same relative path "
                        f"({Path(rec.relative).with_suffix('')} with any image extension, under {', '.join(self.folders(link))})",
                    )  # fmt: skip
                    continue
                with_link = self._with_mask if link.conditioning_type == "mask" else self._with_reference
                sample, why = with_link(sample, found, backend, link)
                if why:
                    skip(skips, rec.path, why)
                    continue
            samples.append(sample)
        return samples, skips

    def _with_mask(self, sample: Sample, mask: Path, backend, link) -> tuple[Sample | None, str | None]:
        try:
            w, h = upright_size(mask)
        except Exception as err:
            return None, f"cannot read its mask {mask} ({err})"
        if w * h > self.cfg.max_image_pixels:
            return None, f"its mask {mask} exceeds dataset.max_image_pixels={self.cfg.max_image_pixels}"
        key = cache_key(
            kind="mask", v=CACHE_VERSION, file=file_digest(mask), size=sample.size, placement=sample.placement
        )
        return replace(sample, mask_path=mask, mask_key=key), None

    def _with_alpha_mask(self, sample: Sample) -> Sample:
        """``sample`` whose loss mask is its own alpha channel (``mask_from_alpha``): keyed apart from
        any mask file's entry, so toggling the option never serves another kind's mask."""
        key = cache_key(
            kind="mask", v=CACHE_VERSION, alpha=True, file=sample.source, size=sample.size, placement=sample.placement
        )
        return replace(sample, mask_path=sample.path, mask_key=key, mask_alpha=True)

    def _with_reference(self, sample: Sample, ref: Path, backend, link) -> tuple[Sample | None, str | None]:
        """``sample`` with its reference fitted (cover-resize, centre crop) into the sample's bucket;
        the reference passes the same size checks as the image."""
        try:
            size = upright_size(ref)
            why = self.size_problem(size, backend)
        except Exception as err:  # not an image, truncated header, ...
            why = f"cannot read image ({err})"
        if why:
            return None, f"its reference {ref}: {why}"
        placement = fit(size, sample.placement.bucket, "center")
        reference = Sample(link.id, ref, "", size, placement, self.latent_key(file_digest(ref), placement), "")
        return replace(sample, reference=reference), None
