"""Typed dataset configuration (``dataset=`` group): image backends plus one text-embeds backend.

Two equivalent forms:
    * the single-folder shorthand (``dataset.instance_data_dir``, ``dataset.resolution``, ...), a
      square crop at ``resolution`` — what ``python -m flux_lightning`` and most runs use;
    * ``dataset.backends`` (a list of :class:`ImageBackendConfig`), field names as in SimpleTuner's
      ``multidatabackend.json``; or ``dataset.backend_file=path/to/multidatabackend.json`` to use
      such a file unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import Problem

CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt", "parquet", "csv", "huggingface")
BACKEND_TYPES = ("local", "huggingface")
CROP_STYLES = ("center", "random", "corner")
CROP_ASPECTS = ("square", "preserve", "closest", "random")
RESOLUTION_TYPES = ("pixel", "area", "pixel_area")
DATASET_TYPES = ("image", "conditioning")
CONDITIONING_TYPES = ("mask", "reference")
SHORTHAND_IDS = ("default", "demo")  # the backend the single-folder shorthand becomes
SHORTHAND_REFERENCE_ID = "default-reference"  # the reference backend of dataset.conditioning_data_dir


def backend_field(backend_id: str, name: str) -> str:
    """The config key a user sets for field ``name`` of backend ``backend_id`` (for messages):
    ``dataset.<name>`` for the shorthand's backends, else ``dataset.backends[<id>].<name>``."""
    if backend_id == SHORTHAND_REFERENCE_ID:
        return "dataset.conditioning_data_dir" if name == "instance_data_dir" else f"dataset.{name}"
    return f"dataset.{name}" if backend_id in SHORTHAND_IDS else f"dataset.backends[{backend_id}].{name}"


@dataclass
class ImageBackendConfig:
    """One image folder and how to caption, size and crop it (SimpleTuner's field names).

    Attributes:
        id: unique name, used in errors, logs and ``conditioning_data`` links.
        type: storage type: ``local`` (image files under ``instance_data_dir``) or ``huggingface``
            (the rows of a *local* Hugging Face ``datasets`` dataset named by ``dataset_name``; see
            :mod:`flux_lightning.data.huggingface`; needs ``pip install "flux-lightning[huggingface]"``).
        dataset_type: ``image`` (trained on) or ``conditioning`` (e.g. masks linked from another backend).
        conditioning_type: for conditioning backends: ``mask`` (white = train, black = ignore) or
            ``reference`` (the reference image of an edit pair, for flavours that train on pairs:
            kontext; fitted into its training image's bucket, served as ``reference_latents``).
        instance_data_dir: the folder (or a list of folders), searched recursively.
        disabled: leave the backend out.
        caption_strategy: ``filename``, ``textfile``, ``instanceprompt``, ``parquet`` or ``csv``;
            ``huggingface`` (the ``caption_column`` of a ``type: huggingface`` backend, which takes
            only ``huggingface`` or ``instanceprompt``).
        metadata_file: for ``parquet``/``csv``: the table (default ``<folder>/metadata.<ext>``).
        metadata_filename_column / metadata_caption_column: the table's columns.
        instance_prompt: caption for ``instanceprompt``; replaces ``<token>`` in validation prompts.
        resolution: pixels (``pixel``, ``pixel_area``) or megapixels (``area``).
        resolution_type: ``pixel`` = shorter side; ``pixel_area`` = area of a resolution^2 square;
            ``area`` = resolution megapixels (1.0 = 1024^2).
        minimum_image_size: smaller images are skipped (same unit as ``resolution``); null = no
            minimum beyond the one every backend has (shorter side >= 16 px, one latent patch).
        maximum_image_size / target_downsample_size: larger images are first downsampled to target.
        crop: crop to the bucket aspect chosen by ``crop_aspect`` (else keep the image's aspect).
        crop_aspect: ``square``, ``preserve``, ``closest`` or ``random`` (the latter two pick from
            ``crop_aspect_buckets``, width/height ratios).
        crop_style: ``center``, ``random`` (fixed per file) or ``corner`` (top-left).
        repeats: extra passes over this backend per epoch (0 = each image once).
        probability: relative chance of drawing this backend's batches.
        is_regularisation_data: target = the base model's prediction with the adapter off.
        is_regularization_data: the US spelling, accepted like SimpleTuner does (null = not given).
        cache_dir_vae: latent cache folder for this backend (default ``<dataset.cache_dir>/vae``).
        skip_file_discovery: accepted for compatibility; ``vae`` = never encode, use what is cached.
        caption_dropout_probability: null = ``dataset.caption_dropout_probability``.
        conditioning_data: id of a ``conditioning`` backend (masks or references): each training
            image uses the file of the same relative path (any image extension) in it; folder i of
            this backend pairs with folder i of that one when both list as many folders. An image
            without one is skipped (and counted).
        metadata_backend: accepted for compatibility (``discovery``, ``huggingface``).
        mask_from_alpha: an image's alpha channel is its loss mask (opaque = train, transparent =
            ignore, at latent size like a ``conditioning_type: mask`` backend's masks; an image
            without alpha trains everywhere); the pixels are still composited on white for the
            latent. False = transparency is only composited on white. Not with a linked mask
            backend (``conditioning_data``) or ``mask_column``.
        dataset_name: ``type: huggingface`` only: a local dataset: a folder written by
            ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a parquet file, a folder of
            parquet files (searched recursively) or a glob of them (converted once into ``datasets``'
            Arrow cache under ``<dataset.cache_dir>/huggingface``). Hub ids are refused (nothing is
            downloaded): save the dataset locally first.
        split: ``type: huggingface``: the split of a saved ``DatasetDict``.
        image_column: ``type: huggingface``: the column holding the images (an ``Image``
            feature, encoded bytes, or a file path relative to the dataset's folder).
        caption_column: ``type: huggingface``: the column holding the captions.
        mask_column: ``type: huggingface``: a column of loss-mask images (white = train, black =
            ignore), as a mask backend's files; null = no mask.
    """

    id: str = "default"
    type: str = "local"
    dataset_type: str = "image"
    conditioning_type: str = "mask"
    instance_data_dir: Any = None
    disabled: bool = False
    caption_strategy: str = "filename"
    metadata_file: str | None = None
    metadata_filename_column: str = "filename"
    metadata_caption_column: str = "caption"
    instance_prompt: str | None = None
    resolution: float = 1024
    resolution_type: str = "pixel_area"
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    crop: bool = False
    crop_aspect: str = "square"
    crop_aspect_buckets: list[float] | None = None
    crop_style: str = "center"
    repeats: int = 0
    probability: float = 1.0
    is_regularisation_data: bool = False
    is_regularization_data: bool | None = None
    cache_dir_vae: str | None = None
    skip_file_discovery: str = ""
    caption_dropout_probability: float | None = None
    conditioning_data: str | None = None
    metadata_backend: str = "discovery"
    mask_from_alpha: bool = False
    dataset_name: str | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "caption"
    mask_column: str | None = None

    def __post_init__(self):
        if self.is_regularization_data and not self.is_regularisation_data:
            self.is_regularisation_data = True  # the US spelling alone; a clash is reported by problems()

    def folders(self) -> list[str]:
        return _folder_list(self.instance_data_dir)

    def problems(self) -> list[Problem]:
        """Every invalid field, as ``dataset.backends[<id>].<field>: ...`` lines with the fix."""
        name = f"dataset.backends[{self.id}]"
        out = []

        def bad(fld, msg):
            out.append(Problem(f"{name}.{fld}", f"{name}.{fld}: {msg}"))

        if not str(self.id).strip():
            bad("id", "is empty; give each backend a name (its cache folder and messages use it)")
        if self.type not in BACKEND_TYPES:
            bad("type", f"{self.type!r} is not supported; use {' or '.join(BACKEND_TYPES)}")
        if self.dataset_type not in DATASET_TYPES:
            bad("dataset_type", f"{self.dataset_type!r} is unknown; use {', '.join(DATASET_TYPES)}")
        if self.dataset_type == "conditioning" and self.conditioning_type not in CONDITIONING_TYPES:
            bad("conditioning_type", f"{self.conditioning_type!r} is unknown; use {' or '.join(CONDITIONING_TYPES)}")
        if self.type == "huggingface":
            self._huggingface_problems(bad)
        else:
            if not self.folders():
                bad("instance_data_dir", "is missing; point it at a folder of images")
            elif any(not str(f).strip() for f in self.folders()):
                bad("instance_data_dir", "is an empty path; point it at a folder of images")
            if self.caption_strategy == "huggingface":
                bad(
                    "caption_strategy",
                    "huggingface needs type: huggingface; use filename, textfile, instanceprompt, parquet or csv",
                )
            for key in ("dataset_name", "mask_column"):
                if getattr(self, key) is not None:
                    bad(key, f"is used by type: huggingface only; remove it (this backend is type: {self.type})")
        if self.mask_from_alpha and self.dataset_type != "image":
            bad(
                "mask_from_alpha",
                "applies to image backends (dataset_type: image); remove it from this conditioning backend",
            )
        if self.caption_strategy not in CAPTION_STRATEGIES:
            bad("caption_strategy", f"{self.caption_strategy!r} is unknown; use one of {', '.join(CAPTION_STRATEGIES)}")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            bad("instance_prompt", "is required by caption_strategy=instanceprompt")
        if self.resolution_type not in RESOLUTION_TYPES:
            bad("resolution_type", f"{self.resolution_type!r} is unknown; use one of {', '.join(RESOLUTION_TYPES)}")
        elif self.resolution_type != "area" and (self.resolution <= 0 or self.resolution % 16):
            bad("resolution", f"{self.resolution:g} must be a positive multiple of 16 (latents are packed 2x2)")
        elif self.resolution <= 0:
            bad("resolution", "must be positive (megapixels)")
        elif self.resolution > (MAX_MEGAPIXELS if self.resolution_type == "area" else MAX_RESOLUTION):
            bad(
                "resolution",
                f"{self.resolution:g} is beyond any image this can train on (at most "
                f"{MAX_RESOLUTION} px, or {MAX_MEGAPIXELS} megapixels with resolution_type: area)",
            )
        if self.crop_aspect not in CROP_ASPECTS:
            bad("crop_aspect", f"{self.crop_aspect!r} is unknown; use one of {', '.join(CROP_ASPECTS)}")
        if self.crop and self.crop_aspect in ("closest", "random") and not self.crop_aspect_buckets:
            bad("crop_aspect_buckets", f"crop_aspect={self.crop_aspect} needs a list of aspect ratios (w/h)")
        if self.crop_style not in CROP_STYLES:
            bad("crop_style", f"{self.crop_style!r} is unknown; use one of {', '.join(CROP_STYLES)}")
        if self.is_regularization_data is not None and self.is_regularization_data != self.is_regularisation_data:
            bad("is_regularization_data", "and is_regularisation_data disagree (one spelling, two values); keep one")
        if self.repeats < 0:
            bad("repeats", "must be >= 0")
        if self.probability < 0:
            bad("probability", "must be >= 0")
        p = self.caption_dropout_probability
        if p is not None and not 0.0 <= p <= 1.0:
            bad("caption_dropout_probability", "must be within [0, 1]")
        return out

    def _huggingface_problems(self, bad) -> None:
        """The fields a ``type: huggingface`` backend needs or cannot use (reported through ``bad``)."""
        if not self.dataset_name:
            bad("dataset_name", "is missing; point it at a dataset saved with save_to_disk, or at parquet files")
        if self.instance_data_dir is not None:
            bad("instance_data_dir", "is not used by type: huggingface; put the dataset's folder in dataset_name")
        if self.dataset_type != "image":
            bad("dataset_type", "type: huggingface backends are image backends; give masks with mask_column")
        if self.caption_strategy not in ("huggingface", "instanceprompt"):
            bad(
                "caption_strategy",
                f"{self.caption_strategy!r} does not apply to type: huggingface; use huggingface (caption_column) or instanceprompt",
            )
        if self.conditioning_data:
            bad(
                "conditioning_data",
                "is not supported by type: huggingface (rows have no file names to link); use mask_column or mask_from_alpha",
            )
        if self.mask_column and self.mask_from_alpha:
            bad("mask_from_alpha", "and mask_column both give the loss mask; keep one")
        for name in ("image_column", "caption_column"):
            if not getattr(self, name):
                bad(name, "is empty; name a column of the dataset")


@dataclass
class TextEmbedsConfig:
    """The text-embeds backend: where caption embeddings are cached and how many per encoder call."""

    id: str = "text-embeds"
    type: str = "local"
    dataset_type: str = "text_embeds"
    cache_dir: str | None = None
    write_batch_size: int = 128
    default: bool = True
    disabled: bool = False


_SHORTHAND = (
    "instance_data_dir",
    "caption_strategy",
    "instance_prompt",
    "resolution",
    "crop_style",
    "minimum_image_size",
    "conditioning_data_dir",
    "mask_from_alpha",
)


@dataclass
class DatasetConfig:
    """Image backends, the text-embeds backend and the loader settings shared by all backends.

    Attributes:
        backends: the image (and conditioning) backends; empty = use the single-folder shorthand.
        text_embeds: the text-embeds backend.
        backend_file: a SimpleTuner ``multidatabackend.json`` to read backends from, unchanged.
        instance_data_dir, caption_strategy, instance_prompt, resolution, crop_style: the
            single-folder shorthand (one backend, square crop at ``resolution`` pixels);
            ``instance_data_dir`` null = generate the demo dataset (coloured shapes).
        caption_dropout_probability: default chance a sample trains on the empty caption.
        batch_size: images per step per device (every batch is one backend and one bucket).
        num_workers: dataloader workers; null = sized automatically (see
            :func:`flux_lightning.data.datamodule.default_num_workers`).
        vae_batch_size: images per VAE call while caching.
        cache_dir: root of the shared caches (``vae/``, ``text/``, ``demo/``), outside run dirs.
        demo_images: images in the generated demo dataset.
        minimum_image_size: shorthand only: images whose shorter side is below this many pixels are
            skipped; null = a quarter of ``resolution`` (an image upscaled more than 4x is mostly
            blur: 256 px at 1024), 0 = no minimum. Backends set their own ``minimum_image_size``.
        max_image_pixels: images with more pixels are skipped, by the size in the file's header,
            before any pixel is decoded (decompression-bomb guard).
        max_aspect_ratio: images whose longer side exceeds this many times the shorter are skipped
            (also read from the header: a 1,000,000x10 strip would be resized to millions of
            pixels wide for its bucket); the resize before cropping is then at most this many times
            the bucket's area.
        seed: seed for random crops, sampling order and caption dropout.
        conditioning_data_dir: shorthand only: reference images for flavours that train on image
            pairs (kontext): a folder (or a list, one per ``instance_data_dir`` folder) with the
            same relative file names. It becomes a backend with ``conditioning_type: reference``
            linked by ``conditioning_data`` (with ``dataset.backends``, write that backend
            yourself). Null with the demo data (no ``instance_data_dir``) = grayscale copies of the
            generated images (see :mod:`flux_lightning.data.references`).
        eval_fraction: fraction of the source images held out of training for the stable eval loss
            (:class:`~flux_lightning.callbacks.EvalLoss`): chosen by a hash of the file's content,
            never trained on, every copy of a held-out file (crops, resolutions, backends) leaves
            training; only from backends with at least ``eval_min_images`` images. 0 = no split.
            The library default is 0; ``python -m flux_lightning`` sets 0.1 (schema.TrainConfig).
        eval_min_images: a backend needs this many source images to give some to the eval split
            (smaller datasets train on every image; use ``eval_data_dir`` to evaluate them).
        eval_data_dir: a folder (or list) of separate eval images, captioned and sized like the
            first backend (label ``eval``); used alongside the held-out split.
        mask_from_alpha: shorthand only: each image's alpha channel is its loss mask (see
            :attr:`ImageBackendConfig.mask_from_alpha`); null = false (transparency is composited
            on white).
    """

    backends: list[ImageBackendConfig] = field(default_factory=list)
    text_embeds: TextEmbedsConfig = field(default_factory=TextEmbedsConfig)
    backend_file: str | None = None
    instance_data_dir: Any = None
    caption_strategy: str | None = None
    instance_prompt: str | None = None
    resolution: int | None = None
    crop_style: str | None = None
    minimum_image_size: int | None = None
    caption_dropout_probability: float = 0.1
    batch_size: int = 1
    num_workers: int | None = None
    vae_batch_size: int = 4
    cache_dir: str = "~/.cache/flux_lightning"
    demo_images: int = 16
    max_image_pixels: int = 89_478_485
    max_aspect_ratio: float = 8.0
    seed: int = 0
    conditioning_data_dir: Any = None
    eval_fraction: float = 0.0
    eval_min_images: int = 50
    eval_data_dir: Any = None
    mask_from_alpha: bool | None = None

    def uses_shorthand(self) -> bool:
        return not self.backends and self.backend_file is None

    def shorthand_minimum_size(self) -> int:
        """The shorthand's minimum shorter side in pixels (see ``minimum_image_size``)."""
        if self.minimum_image_size is not None:
            return self.minimum_image_size
        return (self.resolution or 1024) // 4

    def image_backends(self) -> list[ImageBackendConfig]:
        """The enabled backends (the shorthand becomes one backend), not yet read from a file."""
        if self.uses_shorthand():
            references = self.instance_data_dir is not None and self.conditioning_data_dir is not None
            image = [
                ImageBackendConfig(
                    id="demo" if self.instance_data_dir is None else "default",
                    instance_data_dir=self.instance_data_dir,
                    caption_strategy=self.caption_strategy or "filename",
                    instance_prompt=self.instance_prompt,
                    resolution=self.resolution or 1024,
                    resolution_type="pixel",
                    crop=True,
                    crop_aspect="square",
                    crop_style=self.crop_style or "center",
                    minimum_image_size=self.shorthand_minimum_size(),
                    conditioning_data=SHORTHAND_REFERENCE_ID if references else None,
                    mask_from_alpha=bool(self.mask_from_alpha),
                )
            ]
            if references:
                image.append(
                    ImageBackendConfig(
                        id=SHORTHAND_REFERENCE_ID,
                        dataset_type="conditioning",
                        conditioning_type="reference",
                        instance_data_dir=self.conditioning_data_dir,
                        resolution=image[0].resolution,
                        resolution_type="pixel",
                    )
                )
            return image
        return [b for b in self.backends if not b.disabled]

    def eval_folders(self) -> list[str]:
        """``eval_data_dir`` as a list of folders."""
        return _folder_list(self.eval_data_dir)

    def problems(self) -> list[Problem]:
        """Every invalid field, each as one line naming the field and the fix."""
        out = self._shorthand_problems() if self.uses_shorthand() else self._backend_problems()
        if not 0.0 <= self.caption_dropout_probability <= 1.0:
            out.append(
                Problem(
                    "dataset.caption_dropout_probability", "dataset.caption_dropout_probability must be within [0, 1]"
                )
            )
        if self.num_workers is not None and self.num_workers < 0:
            out.append(
                Problem(
                    "dataset.num_workers", f"dataset.num_workers={self.num_workers} must be >= 0 (or null = automatic)"
                )
            )
        if self.max_image_pixels < 1:
            out.append(
                Problem("dataset.max_image_pixels", f"dataset.max_image_pixels={self.max_image_pixels} must be >= 1")
            )
        if not self.max_aspect_ratio >= 1:
            out.append(
                Problem(
                    "dataset.max_aspect_ratio",
                    f"dataset.max_aspect_ratio={self.max_aspect_ratio} must be >= 1 (longer side / shorter side)",
                )
            )
        for name in ("batch_size", "vae_batch_size"):
            if getattr(self, name) < 1:
                out.append(Problem(f"dataset.{name}", f"dataset.{name} must be >= 1"))
        if self.text_embeds.write_batch_size < 1:
            out.append(
                Problem("dataset.text_embeds.write_batch_size", "dataset.text_embeds.write_batch_size must be >= 1")
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            out.append(
                Problem(
                    "dataset.eval_fraction",
                    f"dataset.eval_fraction={self.eval_fraction} must be within [0, 1) (0 = no held-out split)",
                )
            )
        if self.eval_min_images < 0:
            out.append(
                Problem("dataset.eval_min_images", f"dataset.eval_min_images={self.eval_min_images} must be >= 0")
            )
        return out

    def _shorthand_problems(self) -> list[Problem]:
        out = []
        strategy = self.caption_strategy or "filename"
        if strategy not in ("filename", "textfile", "instanceprompt"):
            out.append(
                Problem(
                    "dataset.caption_strategy",
                    f"dataset.caption_strategy={strategy!r} is unknown; use filename, textfile or "
                    "instanceprompt (parquet/csv captions need dataset.backends)",
                )
            )
        if strategy == "instanceprompt" and not self.instance_prompt:
            out.append(
                Problem(
                    "dataset.caption_strategy",
                    "dataset.caption_strategy=instanceprompt needs dataset.instance_prompt=<text>",
                )
            )
        res = self.resolution or 1024
        if res <= 0 or res % 16:
            out.append(
                Problem(
                    "dataset.resolution",
                    f"dataset.resolution={res} must be a positive multiple of 16 "
                    "(latents are 1/8 of the image and are packed in 2x2 patches)",
                )
            )
        if self.minimum_image_size is not None and self.minimum_image_size < 0:
            out.append(
                Problem(
                    "dataset.minimum_image_size",
                    f"dataset.minimum_image_size={self.minimum_image_size} must be >= 0 (0 = no minimum, null = resolution/4)",
                )
            )
        if (self.crop_style or "center") not in CROP_STYLES:
            out.append(
                Problem(
                    "dataset.crop_style",
                    f"dataset.crop_style={self.crop_style!r} is unknown; use one of {', '.join(CROP_STYLES)}",
                )
            )
        references = _folder_list(self.conditioning_data_dir)
        if references and self.instance_data_dir is None:
            out.append(
                Problem(
                    "dataset.conditioning_data_dir",
                    "dataset.conditioning_data_dir needs dataset.instance_data_dir (the generated demo data makes "
                    "its own grayscale references); set both, or remove dataset.conditioning_data_dir",
                )
            )
        elif references and len(references) != len(_folder_list(self.instance_data_dir)):
            out.append(
                Problem(
                    "dataset.conditioning_data_dir",
                    "dataset.conditioning_data_dir must list one folder per dataset.instance_data_dir folder",
                )
            )
        return out

    def _backend_problems(self) -> list[Problem]:
        out = []
        extra = self.shorthand_fields_set()
        if "conditioning_data_dir" in extra and self.backend_file is None:
            extra.remove("conditioning_data_dir")
            out.append(
                Problem(
                    "dataset.conditioning_data_dir",
                    "dataset.conditioning_data_dir is part of the single-folder shorthand, but dataset.backends is "
                    "set: add a backend with dataset_type: conditioning, conditioning_type: reference and link it "
                    "from the image backend with conditioning_data: <its id>",
                )
            )
        if extra and self.backend_file is None:  # with a file they are ignored with a warning (resolve_dataset)
            out.append(
                Problem(
                    f"dataset.{extra[0]}",
                    f"dataset.{extra[0]} is part of the single-folder shorthand, but dataset.backends "
                    "(or backend_file) is set: put it on each backend instead",
                )
            )
        if self.backend_file is not None:
            return out  # backends are read (and checked) when the file is loaded
        backends = self.image_backends()
        for b in backends:
            out += b.problems()
        ids = [b.id for b in backends]
        for dup in sorted({i for i in ids if ids.count(i) > 1}):
            out.append(
                Problem("dataset.backends", f"dataset.backends: id {dup!r} is used twice; give each backend its own id")
            )
        by_id = {b.id: b for b in backends}
        for b in backends:
            link = b.conditioning_data
            if link and (link not in by_id or by_id[link].dataset_type != "conditioning"):
                out.append(
                    Problem(
                        f"dataset.backends[{b.id}].conditioning_data",
                        f"dataset.backends[{b.id}].conditioning_data: {link!r} is not an enabled backend "
                        "with dataset_type: conditioning",
                    )
                )
            elif link and b.mask_from_alpha and by_id[link].conditioning_type == "mask":
                out.append(
                    Problem(
                        f"dataset.backends[{b.id}].mask_from_alpha",
                        f"dataset.backends[{b.id}].mask_from_alpha: the linked backend {link!r} already gives the loss "
                        "masks; use one: remove mask_from_alpha, or the conditioning_data link",
                    )
                )
            elif link and len(by_id[link].folders()) not in (1, len(b.folders())):
                out.append(
                    Problem(
                        f"dataset.backends[{link}].instance_data_dir",
                        f"dataset.backends[{link}].instance_data_dir: list one folder, or one per folder of "
                        f"backend {b.id!r} (which it conditions)",
                    )
                )
        trained = [b for b in backends if b.dataset_type == "image"]
        if not trained:
            out.append(
                Problem(
                    "dataset.backends", "dataset.backends: no enabled image backend; add one or set disabled: false"
                )
            )
        elif not any(b.probability > 0 for b in trained):
            out.append(
                Problem(
                    "dataset.backends",
                    "dataset.backends: every backend has probability 0; give one a positive probability",
                )
            )
        return out

    def shorthand_fields_set(self) -> list[str]:
        """The single-folder shorthand fields that are set (not null)."""
        return [f for f in _SHORTHAND if getattr(self, f) is not None]

    def with_backends(self, backends: list[ImageBackendConfig], text_embeds: TextEmbedsConfig) -> DatasetConfig:
        """These backends instead of ``backend_file`` and the shorthand fields."""
        cleared = {f: None for f in _SHORTHAND}
        return replace(self, backends=backends, text_embeds=text_embeds, backend_file=None, **cleared)


MAX_RESOLUTION = 16384  # px on a side: 64k latent tokens already; Flux was trained up to 2 MP
MAX_MEGAPIXELS = 256


def _folder_list(dirs) -> list[str]:
    if dirs is None:
        return []
    return [str(dirs)] if isinstance(dirs, str) else [str(d) for d in dirs]


IMAGE_FIELDS = {f.name for f in fields(ImageBackendConfig)}
TEXT_FIELDS = {f.name for f in fields(TextEmbedsConfig)}
