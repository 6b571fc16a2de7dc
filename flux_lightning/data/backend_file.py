"""Read SimpleTuner's ``multidatabackend.json`` unchanged into typed backend configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import IMAGE_FIELDS, TEXT_FIELDS, DatasetConfig, ImageBackendConfig, TextEmbedsConfig
from .discovery import DataError

log = logging.getLogger(__name__)


def load_backend_file(path: str | Path) -> tuple[list[ImageBackendConfig], TextEmbedsConfig]:
    """Image backends and the text-embeds backend of a ``multidatabackend.json`` document.

    Keys this library does not use are reported in one warning per backend, never dropped silently.
    """
    path = Path(path).expanduser()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"dataset.backend_file: cannot read {path} ({err.strerror})") from None
    except ValueError as err:
        raise DataError(f"dataset.backend_file: {path} is not valid JSON ({err})") from None
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise DataError(f"dataset.backend_file: {path} must hold a JSON list of backend objects")
    images, texts = [], []
    for n, entry in enumerate(doc):
        is_text = entry.get("dataset_type") == "text_embeds"
        known = TEXT_FIELDS if is_text else IMAGE_FIELDS
        ignored = sorted(set(entry) - known)
        name = entry.get("id", f"#{n}")
        if ignored:
            log.warning("%s: backend %r: ignoring keys this trainer does not use: %s", path.name, name, ignored)
        values = {k: v for k, v in entry.items() if k in known}
        if is_text:
            texts.append(TextEmbedsConfig(**values))
        else:
            values.setdefault("id", str(name))
            images.append(ImageBackendConfig(**values))
    enabled_texts = [t for t in texts if not t.disabled]
    if len(enabled_texts) > 1 and sum(t.default for t in enabled_texts) != 1:
        raise DataError(f"dataset.backend_file: {path} has several text_embeds backends; mark one default: true")
    text = next((t for t in enabled_texts if t.default), enabled_texts[0] if enabled_texts else TextEmbedsConfig())
    return images, text


def resolve_dataset(cfg: DatasetConfig) -> DatasetConfig:
    """``cfg`` with ``backend_file`` (if any) read into ``backends``/``text_embeds``."""
    if cfg.backend_file is None:
        return cfg
    images, text = load_backend_file(cfg.backend_file)
    return cfg.with_backends(images, text)
