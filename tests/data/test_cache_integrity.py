"""Nothing corrupt is ever read from the caches: truncated, zero-byte, NaN-filled, mislabelled or
misshapen entries are reported by file name and re-encoded (prepare_data), replaced by a stand-in
(after prepare_data), or skipped and counted when they cannot be re-encoded; never a crash, never
garbage in a batch."""

import logging
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux_lightning.data import DataError, DatasetConfig, FluxDataModule, caching
from flux_lightning.data.cache import CacheEntryError, TensorCache, latent_spec, mask_spec, text_spec
from flux_lightning.data.config import ImageBackendConfig

from ..support.cli import flux_lightning
from ..support.helpers import tiny_cfg

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def _images(folder, n=3, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, COLOURS[i]).save(folder / f"image {i}.png")
    return folder


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero(path):
    path.write_bytes(b"")


def fill(path, value=float("nan")):
    """Rewrite the entry with every float set to ``value``, keeping its metadata (key claim included)."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = {k: v.fill_(value) if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata=meta)


def _masked_dm(model_cfg, tmp_path, **kw):
    img = _images(tmp_path / "img")
    (tmp_path / "mask").mkdir(exist_ok=True)
    for i in range(3):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, : 16 * (i + 1)] = 255  # a different mask (and entry) per image
        Image.fromarray(mask).save(tmp_path / "mask" / f"image {i}.png")
    backends = [
        ImageBackendConfig(id="img", instance_data_dir=str(img), resolution=64, conditioning_data="m", **kw),
        ImageBackendConfig(
            id="m", instance_data_dir=str(tmp_path / "mask"), resolution=64, dataset_type="conditioning"
        ),
    ]
    cfg = DatasetConfig(
        backends=backends, cache_dir=str(tmp_path / "cache"), batch_size=1, caption_dropout_probability=0.0
    )
    dm = FluxDataModule(cfg, model_cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _entries(dm):
    """Every entry a training batch reads: path -> tensors (copied: loads are memory-mapped)."""
    out = {}
    for s in dm.train_dataset.samples:
        cache = dm.latent_caches[s.backend]
        for c, key in ((cache, s.latent_key), (cache, s.mask_key), (dm.text_cache, s.text_key)):
            out[c.path(key)] = {k: v.clone() for k, v in c.load(key).items()}
    return out


def test_entries_record_their_key_and_reads_check_kind_shape_dtype_and_key(tmp_path):
    cache = TensorCache(tmp_path)
    a, b = "a" * 64, "b" * 64
    cache.save(a, {"latents": torch.zeros(16, 8, 8)})
    with safe_open(cache.path(a), "pt") as f:
        assert f.metadata()["key"] == a
    assert torch.equal(cache.load(a, latent_spec((64, 64)))["latents"], torch.zeros(16, 8, 8))
    for spec, reason in [
        (latent_spec((128, 64)), r"'latents' has shape \(16, 8, 8\), expected \(16, 8, 16\)"),
        (mask_spec((64, 64)), r"holds tensors \['latents'\], a mask entry holds \['mask'\]"),
    ]:
        with pytest.raises(CacheEntryError, match=reason):
            cache.load(a, spec)
    cache.save(b, {"latents": torch.zeros(16, 8, 8, dtype=torch.float16)})
    with pytest.raises(CacheEntryError, match="'latents' is F16, expected float32"):
        cache.load(b, latent_spec((64, 64)))
    cache.path(b).write_bytes(cache.path(a).read_bytes())  # a copy of another entry
    with pytest.raises(CacheEntryError, match=f"{b}.safetensors is unusable.*claims key aaaa"):
        cache.load(b)
    save_file({"latents": torch.ones(16, 8, 8)}, cache.path(b))  # written before keys were recorded
    assert cache.load(b, latent_spec((64, 64)))["latents"].sum() == 16 * 64
    save_file({"mask": torch.full((1, 8, 8), 1.5)}, cache.path(b))
    with pytest.raises(CacheEntryError, match=r"'mask' has values outside \[0, 1\]"):
        cache.load(b, mask_spec((64, 64)))
    spec = text_spec(4)
    save_file(
        {
            "prompt_embeds": torch.zeros(4, 8),
            "pooled_prompt_embeds": torch.zeros(8),
            "attention_mask": torch.ones(5, dtype=torch.uint8),
        },
        cache.path(b),
    )
    with pytest.raises(CacheEntryError, match=r"'attention_mask' has shape \(5,\), expected \(4,\)"):
        cache.load(b, spec)
    assert cache.problem("c" * 64) is None  # absent is not corrupt
    with pytest.raises(CacheEntryError, match="missing"):
        cache.load("c" * 64)


def test_damaged_latent_text_and_mask_entries_are_reported_and_re_encoded(
    tiny_model_cfg, tmp_path, caplog, monkeypatch
):
    model = tiny_model_cfg
    first = _masked_dm(model, tmp_path)
    original = _entries(first)
    s0, s1, s2 = first.train_dataset.samples
    vae, text = first.latent_caches["img"], first.text_cache
    latent = [vae.path(s.latent_key) for s in (s0, s1, s2)]
    masks = [vae.path(s.mask_key) for s in (s0, s1, s2)]
    texts = [text.path(s.text_key) for s in (s0, s1, s2)]
    shutil.copyfile(latent[1], latent[2])  # a valid entry under another entry's name
    truncate(latent[0])
    fill(latent[1])
    zero(texts[0])
    fill(texts[1])
    truncate(masks[0])
    fill(masks[1])
    fill(masks[2], 7.0)  # finite, but no mask holds 7
    wide = {k: v.clone() for k, v in load_file(texts[2]).items()}  # a well-formed entry of the wrong width
    wide["prompt_embeds"] = torch.zeros(wide["prompt_embeds"].shape[0], wide["prompt_embeds"].shape[1] + 1)
    save_file(wide, texts[2], metadata={"key": s2.text_key})
    damaged = [latent[0], latent[1], latent[2], texts[0], texts[1], texts[2], masks[0], masks[1], masks[2]]

    encoded = []
    real = caching.encode_images
    monkeypatch.setattr(caching, "encode_images", lambda v, px, seeds: encoded.append(len(seeds)) or real(v, px, seeds))
    with caplog.at_level(logging.WARNING):
        again = _masked_dm(model, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for path in damaged:
        assert sum(str(path) in w for w in warnings) == 1, (path, warnings)
    assert sum(encoded) == 3, "exactly the three damaged latents are encoded again"
    assert len(again.train_dataset) == 3 and again.skipped == 0
    for path, tensors in original.items():  # rewritten, verified, and equal to a fresh encode
        for name, value in tensors.items():
            torch.testing.assert_close(load_file(path)[name], value, rtol=1e-5, atol=1e-6)
    for s in again.train_dataset.samples:
        vae.load(s.latent_key, latent_spec(s.placement.bucket))
        vae.load(s.mask_key, mask_spec(s.placement.bucket))
        text.load(s.text_key, text_spec(model.spec.t5_max_length))
    for batch in again.train_dataloader():
        assert all(torch.isfinite(v).all() for v in batch.values() if v.is_floating_point())


def test_entries_that_go_bad_after_prepare_data_get_a_deterministic_stand_in(tiny_model_cfg, tmp_path, caplog):
    dm = _masked_dm(tiny_model_cfg, tmp_path)
    ds = dm.train_dataset
    s0, s1, _ = ds.samples
    expected = {k: v.clone() for k, v in ds.item(0, 2).items()}
    bad_latent = dm.latent_caches["img"].path(s0.latent_key)
    bad_text = dm.text_cache.path(s1.text_key)
    fill(bad_latent)
    truncate(bad_text)
    with caplog.at_level(logging.WARNING):
        served = [ds[(0, 0)], ds[(0, 1)], ds[(0, 0)], ds[(1, 1)]]
    for item in served:  # the next usable sample of the same backend and bucket, every time
        assert all(torch.equal(item[k], expected[k]) for k in expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings  # each bad file once
    assert str(bad_latent) in warnings[0] and "NaN" in warnings[0] and str(bad_text) in warnings[1]
    for batch in dm.train_dataloader():
        assert torch.isfinite(batch["latents"]).all()
    last = dm.latent_caches["img"].path(ds.samples[2].latent_key)
    zero(last)
    with pytest.raises(DataError, match=re.escape(str(last)) + r" is unusable .*delete it and run again"):
        ds[(0, 2)]  # no usable sample left in the bucket: a clear error, not garbage


def test_bad_entry_of_a_never_encoded_backend_is_skipped_and_counted(tiny_model_cfg, tmp_path, caplog):
    model = tiny_model_cfg
    first = _masked_dm(model, tmp_path)
    s0 = first.train_dataset.samples[0]
    bad = first.latent_caches["img"].path(s0.latent_key)
    truncate(bad)
    with caplog.at_level(logging.WARNING):
        dm = _masked_dm(model, tmp_path, skip_file_discovery="vae")
    assert len(dm.train_dataset) == 2 and dm.skipped == 1
    assert s0.path not in [s.path for s in dm.train_dataset.samples]
    assert re.search(
        re.escape(str(bad)) + r" is corrupt .*skip_file_discovery=vae.*" + re.escape(str(s0.path)) + " is skipped",
        caplog.text,
    )


def test_damaged_kontext_reference_latent_is_re_encoded(cache_root, tmp_path, caplog):
    from flux_lightning import DatasetConfig, FluxDataModule

    model = tiny_cfg(cache_root, "kontext")
    cfg = DatasetConfig(
        resolution=64, batch_size=2, cache_dir=str(tmp_path / "cache"), demo_images=4, caption_dropout_probability=0.0
    )

    def prepared():
        dm = FluxDataModule(cfg, model)
        dm.prepare_data()
        dm.setup()
        return dm

    dm = prepared()
    references = [s.reference for s in dm.train_dataset.samples]
    cache = dm.latent_caches[references[0].backend]
    ref = cache.path(references[0].latent_key)
    before = load_file(ref)["latents"].clone()
    truncate(ref)
    fill(cache.path(references[1].latent_key))
    with caplog.at_level(logging.WARNING):
        again = prepared()
    assert str(ref) in caplog.text and len(again.train_dataset) == 4
    torch.testing.assert_close(load_file(ref)["latents"], before, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(again.train_dataset[(0, i)]["reference_latents"]).all() for i in range(4))


@pytest.mark.slow
def test_cli_run_on_a_damaged_cache_re_encodes_and_exits_0(tmp_path):
    from hydra import compose, initialize_config_dir

    from flux_lightning.config.validation import validate
    from flux_lightning.run.train import config_dir

    folder = _images(tmp_path / "data", n=4)
    overrides = [
        f"paths.cache_dir={tmp_path / 'cache'}",
        "dataset=local",
        f"dataset.instance_data_dir={folder}",
        "dataset.resolution=64",
        "trainer.max_steps=2",
        "callbacks.validation=null",
        "callbacks.clip_score=null",
        "logger=csv",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        run = validate(compose("train", overrides=overrides))
    dm = FluxDataModule(run.dataset, run.model)  # the cache the CLI reads: same settings, same keys
    dm.prepare_data()
    dm.setup("fit")
    s0, s1 = dm.train_dataset.samples[:2]
    bad_latent = dm.latent_caches[s0.backend].path(s0.latent_key)
    bad_text = dm.text_cache.path(s1.text_key)
    nan_latent = dm.latent_caches[s1.backend].path(s1.latent_key)
    before = load_file(bad_latent)["latents"].clone()
    truncate(bad_latent)
    zero(bad_text)
    fill(nan_latent)
    cmd = flux_lightning(f"hydra.run.dir={tmp_path / 'run'}", *overrides)
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for path in (bad_latent, bad_text, nan_latent):
        assert f"cache entry {path} is corrupt" in log, path
    assert "Traceback" not in log
    torch.testing.assert_close(load_file(bad_latent)["latents"], before, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(load_file(nan_latent)["latents"]).all()
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_unreadable_mask_skips_its_image_with_a_named_warning(tiny_model_cfg, tmp_path, caplog):
    img = _images(tmp_path / "img", n=2)
    (tmp_path / "mask").mkdir()
    Image.new("L", (64, 64), 255).save(tmp_path / "mask" / "image 0.png")
    (tmp_path / "mask" / "image 1.png").write_bytes(b"not a png")
    backends = [
        ImageBackendConfig(id="img", instance_data_dir=str(img), resolution=64, conditioning_data="m"),
        ImageBackendConfig(
            id="m", instance_data_dir=str(tmp_path / "mask"), resolution=64, dataset_type="conditioning"
        ),
    ]
    cfg = DatasetConfig(
        backends=backends, cache_dir=str(tmp_path / "cache"), batch_size=1, caption_dropout_probability=0.0
    )
    dm = FluxDataModule(cfg, tiny_model_cfg)
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
        dm.setup("fit")
    assert len(dm.train_dataset) == 1 and dm.skipped == 1
    assert "cannot read its mask" in caplog.text and "image 1.png" in caplog.text
