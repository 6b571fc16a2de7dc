"""Kontext pairs are a kind of backend: a multi-backend dataset (a SimpleTuner ``multidatabackend.json``)
whose image backends each link a ``conditioning_type: reference`` backend trains through ``train()``
on every backend and every aspect bucket, each batch with reference latents of its own shape."""

import json
import math

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from flux_lightning import FluxLoRAModule
from flux_lightning.config.validation import ConfigError, validate
from flux_lightning.data.datasets import CachedLatentDataset
from flux_lightning.run.train import config_dir, train

pytestmark = pytest.mark.usefixtures("one_thread")

SQUARE, WIDE = (64, 64), (128, 64)  # two buckets at resolution 64 (resolution_type pixel)


def _pairs(root, backend, colour):
    """Two square and two wide images, and references of the same names (another extension, another size)."""
    images, refs = root / backend, root / f"{backend}-ref"
    images.mkdir(parents=True), refs.mkdir(parents=True)
    for i, (name, size) in enumerate(
        [("square one", SQUARE), ("square two", SQUARE), ("wide one", WIDE), ("wide two", WIDE)]
    ):
        Image.new("RGB", size, tuple((c + 40 * i) % 256 for c in colour)).save(images / f"{name}.png")
        ref_size = (size[0] * 2, size[1] * 2)  # fitted into the image's bucket
        Image.new("RGB", ref_size, (90 + 30 * i, 90, 90)).save(refs / f"{name}.{'jpg' if i == 0 else 'png'}")
    return images, refs


def _backend_file(tmp_path):
    entries = []
    for backend, colour in (("photos", (200, 30, 30)), ("drawings", (30, 30, 200))):
        images, refs = _pairs(tmp_path / "data", backend, colour)
        common = {"type": "local", "resolution": 64, "resolution_type": "pixel", "caption_strategy": "filename"}
        entries += [
            {"id": backend, "instance_data_dir": str(images), "conditioning_data": f"{backend}-ref", **common},
            {
                "id": f"{backend}-ref",
                "dataset_type": "conditioning",
                "conditioning_type": "reference",
                "instance_data_dir": str(refs),
                **common,
            },
        ]
    entries.append({"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True})
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(entries))
    return path


def _cfg(tmp_path, cache_root, *overrides):
    base = [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={cache_root}",
        "model.tiny_like=kontext",
        "adapter.rank=4",
        "logger=csv",
        "callbacks.validation=null",
        "callbacks.clip_score=null",
        "callbacks.eval_loss=null",
        "callbacks.model_card=null",
        "dataset.batch_size=2",
        "dataset.caption_dropout_probability=0",
        "optimizer.lr=1e-3",
        "trainer.log_every_n_steps=1",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


def test_kontext_trains_on_pairs_from_two_backends_in_two_buckets(tmp_path, cache_root, monkeypatch):
    served, steps = [], []
    item = CachedLatentDataset.item

    def spy_item(self, epoch, i):
        out = item(self, epoch, i)
        s = self.samples[i]
        served.append((s.backend, s.placement.bucket, tuple(out["reference_latents"].shape), s.reference.path.name))
        return out

    step = FluxLoRAModule.training_step

    def spy_step(self, batch, batch_idx):
        steps.append((tuple(batch["latents"].shape), tuple(batch["reference_latents"].shape)))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CachedLatentDataset, "item", spy_item)
    monkeypatch.setattr(FluxLoRAModule, "training_step", spy_step)
    cfg = _cfg(tmp_path, cache_root, f"dataset.backend_file={_backend_file(tmp_path)}", "trainer.max_steps=4")
    assert math.isfinite(train(cfg))

    # one epoch = one batch per (backend, bucket): every group trained, each with its references
    latent = {SQUARE: (16, 8, 8), WIDE: (16, 8, 16)}
    assert {(b, bucket) for b, bucket, _, _ in served} == {
        (b, k) for b in ("photos", "drawings") for k in (SQUARE, WIDE)
    }
    assert all(shape == latent[bucket] for _, bucket, shape, _ in served)
    assert {name for _, _, _, name in served} >= {"square one.jpg", "square two.png", "wide one.png"}
    assert len(steps) == 4 and {s for s, _ in steps} == {(2, *latent[SQUARE]), (2, *latent[WIDE])}
    assert all(target == reference for target, reference in steps)


def test_a_backend_without_references_is_refused_for_kontext(tmp_path, cache_root):
    path = _backend_file(tmp_path)
    entries = json.loads(path.read_text())
    del entries[2]["conditioning_data"]  # drawings lose their link
    path.write_text(json.dumps(entries))
    with pytest.raises(ConfigError) as err:
        validate(_cfg(tmp_path, cache_root, f"dataset.backend_file={path}"), check_sources=False)
    text = str(err.value)
    assert "dataset.backends[drawings].conditioning_data: flavour kontext trains on image pairs" in text
    assert "conditioning_type: reference" in text and "photos" not in text


def test_references_for_a_flavour_that_does_not_use_them_are_refused(tmp_path, cache_root):
    cfg = _cfg(tmp_path, cache_root, f"dataset.backend_file={_backend_file(tmp_path)}", "model.tiny_like=dev")
    with pytest.raises(
        ConfigError,
        match=r"dataset.backends\[photos\].conditioning_data: 'photos-ref' holds reference images, which flavour dev does not use",
    ):
        validate(cfg, check_sources=False)
