"""Reference images (kontext edit pairs) as conditioning backends, and the check that a flavour
gets the pairs it trains on.

A training image's reference is the file of the same relative path (any image extension) in the
conditioning backend its image backend links by ``conditioning_data`` (``conditioning_type:
reference``); ``dataset.conditioning_data_dir`` is the shorthand for such a backend. The reference
is fitted into its image's bucket, cached by the same VAE pass and served as ``reference_latents``
``(B, 16, H, W)``. With generated demo data each shape's reference is its grayscale copy, so the
pair teaches "colour this in".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageOps

from ..atomic_files import build_folder_once
from ..errors import Problem
from .config import DatasetConfig, ImageBackendConfig
from .discovery import IMAGE_EXTENSIONS


def make_grayscale_references(folder: Path) -> Path:
    """A sibling folder with a grayscale copy of every image in ``folder`` (built once, atomically)."""

    def copy_gray(tmp: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                with Image.open(path) as im:
                    ImageOps.grayscale(im).convert("RGB").save(tmp / path.name)

    return build_folder_once(folder.parent / f"{folder.name}-reference-gray", copy_gray)


def reference_backend(backend: ImageBackendConfig, by_id: dict[str, ImageBackendConfig]) -> ImageBackendConfig | None:
    """The ``conditioning_type: reference`` backend that ``backend`` links, or None."""
    link = by_id.get(backend.conditioning_data or "")
    if link is not None and link.dataset_type == "conditioning" and link.conditioning_type == "reference":
        return link
    return None


def with_demo_references(backends: list[ImageBackendConfig]) -> list[ImageBackendConfig]:
    """``backends`` where each generated (demo) image backend without a link gets a reference
    backend with no folder: the datamodule fills it with grayscale copies of the demo images."""
    out = []
    for b in backends:
        if b.dataset_type == "image" and b.type == "local" and b.instance_data_dir is None and not b.conditioning_data:
            ref = ImageBackendConfig(  # the same resolution: the same generated folder
                id=f"{b.id}-reference",
                dataset_type="conditioning",
                conditioning_type="reference",
                resolution=b.resolution,
            )
            out += [replace(b, conditioning_data=ref.id), ref]
        else:
            out.append(b)
    return out


def pairing_problems(dataset: DatasetConfig, pairs: bool, flavour: str) -> list[Problem]:
    """Image backends without the references a flavour that trains on pairs needs (``pairs``), or
    with references a flavour does not use; one line each, naming the field and the fix."""
    if dataset.uses_shorthand():
        given = dataset.conditioning_data_dir is not None
        if pairs and not given and dataset.instance_data_dir is not None:
            return [
                Problem(
                    "dataset.conditioning_data_dir",
                    f"dataset.conditioning_data_dir is required with dataset.instance_data_dir: flavour {flavour} "
                    "trains on image pairs; point it at the folder of reference images (same relative file "
                    "names as the training images)",
                )
            ]
        if not pairs and given:
            return [
                Problem(
                    "dataset.conditioning_data_dir",
                    f"dataset.conditioning_data_dir gives reference images, which flavour {flavour} does not use; "
                    "use model=kontext or remove dataset.conditioning_data_dir",
                )
            ]
        return []
    backends = dataset.image_backends()
    by_id = {b.id: b for b in backends}
    out = []
    for b in backends:
        if b.dataset_type != "image":
            continue
        ref = reference_backend(b, by_id)
        if pairs and ref is None:
            out.append(
                Problem(
                    f"dataset.backends[{b.id}].conditioning_data",
                    f"dataset.backends[{b.id}].conditioning_data: flavour {flavour} trains on image pairs, but "
                    f"backend {b.id!r} links no reference backend; add one with dataset_type: conditioning, "
                    "conditioning_type: reference (same relative file names) and set conditioning_data to its id",
                )
            )
        elif not pairs and ref is not None:
            out.append(
                Problem(
                    f"dataset.backends[{b.id}].conditioning_data",
                    f"dataset.backends[{b.id}].conditioning_data: {ref.id!r} holds reference images, which flavour "
                    f"{flavour} does not use; use model=kontext or remove the link",
                )
            )
    return out
