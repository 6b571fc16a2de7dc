"""Discovery, captions, bad input, the content-addressed caches and the batches the DataModule serves."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from flux_lightning.data import DataError, DatasetConfig, FluxDataModule, caching
from flux_lightning.data import datamodule as dm_mod
from flux_lightning.data.cache import TensorCache
from flux_lightning.data.config import ImageBackendConfig
from flux_lightning.data.demo import make_demo_dataset
from flux_lightning.data.discovery import discover

from ..conftest import make_datamodule


def _image(path, size=(96, 80), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _prepared(model_cfg, cache, **kw):
    dm = make_datamodule(model_cfg, cache, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_demo_dataset_is_captioned_by_file_name(tmp_path):
    folder = make_demo_dataset(tmp_path, count=5, size=64)
    records, skipped = discover(ImageBackendConfig(), [str(folder)])
    assert len(records) == 5 and skipped == []
    assert all(r.caption == r.path.stem and r.caption.startswith("a ") for r in records)
    assert make_demo_dataset(tmp_path, count=5, size=64) == folder  # built once


def test_caption_strategies(tmp_path, caplog):
    _image(tmp_path / "d" / "a_red_square.png")
    _image(tmp_path / "d" / "sub" / "two.jpg")
    (tmp_path / "d" / "sub" / "two.txt").write_text("  a caption from a file \n")
    by_name, _ = discover(ImageBackendConfig(caption_strategy="filename"), [str(tmp_path / "d")])
    assert sorted(r.caption for r in by_name) == ["a red square", "two"]
    with caplog.at_level(logging.WARNING):
        by_file, skipped = discover(ImageBackendConfig(caption_strategy="textfile"), [str(tmp_path / "d")])
    assert [r.caption for r in by_file] == ["a caption from a file"]
    assert [(s.path.name, s.reason) for s in skipped] == [
        ("a_red_square.png", "caption_strategy=textfile but a_red_square.txt is missing (a .caption file would do too)")
    ]
    assert "a_red_square.png" in caplog.text and "a_red_square.txt is missing" in caplog.text
    fixed, _ = discover(
        ImageBackendConfig(caption_strategy="instanceprompt", instance_prompt="sks dog"), [str(tmp_path / "d")]
    )
    assert {r.caption for r in fixed} == {"sks dog"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(resolution=70), "dataset.resolution=70 must be a positive multiple of 16"),
        (dict(caption_strategy="parquet"), "dataset.caption_strategy='parquet' is unknown"),
        (dict(caption_strategy="instanceprompt"), "needs dataset.instance_prompt"),
    ],
)
def test_bad_dataset_fields_are_named(tiny_model_cfg, kwargs, message):
    with pytest.raises(DataError, match=message):
        FluxDataModule(DatasetConfig(**kwargs), tiny_model_cfg)


def test_missing_and_empty_folders(tiny_model_cfg, tmp_path):
    with pytest.raises(DataError, match="folder '.*nowhere' does not exist"):
        make_datamodule(tiny_model_cfg, tmp_path, instance_data_dir=str(tmp_path / "nowhere")).prepare_data()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        make_datamodule(tiny_model_cfg, tmp_path, instance_data_dir=str(tmp_path / "empty")).prepare_data()


def test_unreadable_images_are_skipped_counted_and_fatal_only_when_nothing_is_left(tiny_model_cfg, tmp_path, caplog):
    data = tmp_path / "data"
    _image(data / "good.png")
    (data / "garbage.png").write_bytes(b"this is not a png")
    (data / "zero.jpg").write_bytes(b"")
    good = data / "truncated.png"
    _image(good, size=(128, 128))
    good.write_bytes(good.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        dm = _prepared(tiny_model_cfg, tmp_path / "cache", instance_data_dir=str(data))
    assert len(dm.train_dataset) == 1 and dm.skipped == 3
    for name in ("garbage.png", "zero.jpg", "truncated.png"):
        assert name in caplog.text
    bad_only = tmp_path / "bad"
    (bad_only).mkdir()
    (bad_only / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="no usable images.*1 skipped"):
        _prepared(tiny_model_cfg, tmp_path / "cache", instance_data_dir=str(bad_only))


def test_batches_have_flux_shapes_and_the_right_pairs(tiny_model_cfg, cache_root):
    dm = _prepared(tiny_model_cfg, cache_root, demo_images=6)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (2, 16, 8, 8)
    assert batch["prompt_embeds"].shape == (2, tiny_model_cfg.spec.t5_max_length, 32)
    assert batch["pooled_prompt_embeds"].shape == (2, 32)
    assert batch["attention_mask"].shape == (2, tiny_model_cfg.spec.t5_max_length)
    # every sample pairs its own latent with its own caption (no loader-step indexing)
    for i, s in enumerate(dm.train_dataset.samples):
        item = dm.train_dataset[(0, i)]
        assert torch.equal(item["latents"], dm.latent_caches[s.backend].load(s.latent_key)["latents"])
        assert torch.equal(item["prompt_embeds"], dm.prompt_embedding(s.caption)["prompt_embeds"])


def test_cached_latent_is_a_normalised_vae_sample(tiny_model_cfg, tmp_path):
    from flux_lightning.data.transforms import load_rgb, to_pixels
    from flux_lightning.model.components import load_vae

    _image(tmp_path / "d" / "one.png", size=(64, 64), colour=(10, 200, 90))
    dm = _prepared(tiny_model_cfg, tmp_path / "c", instance_data_dir=str(tmp_path / "d"))
    s = dm.train_dataset.samples[0]
    cached = dm.latent_caches[s.backend].load(s.latent_key)["latents"]
    vae = load_vae(tiny_model_cfg)
    with torch.no_grad():
        dist = vae.encode(to_pixels(load_rgb(s.path), s.placement)[None]).latent_dist
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(caching._seed_of(s.latent_key)))
    expected = (dist.mean[0] + dist.std[0] * noise - 0.1159) * 0.3611
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)


def test_second_run_encodes_nothing_and_changed_settings_encode_only_new_entries(tiny_model_cfg, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(3):
        _image(data / f"img{i}.png", colour=(40 * i, 100, 100))
    cache = tmp_path / "cache"
    first = _prepared(tiny_model_cfg, cache, instance_data_dir=str(data), prompts=["a validation prompt"])
    n_latents = len(list((cache / "vae").rglob("*.safetensors")))
    assert n_latents == 3

    def boom(*a, **k):
        raise AssertionError("encoder loaded on a warm cache")

    monkeypatch.setattr(dm_mod, "load_vae", boom)
    monkeypatch.setattr(dm_mod, "load_text_encoders", boom)
    again = _prepared(tiny_model_cfg, cache, instance_data_dir=str(data), prompts=["a validation prompt"])
    assert [s.latent_key for s in again.train_dataset.samples] == [s.latent_key for s in first.train_dataset.samples]
    monkeypatch.undo()

    encoded = []
    real_encode = caching.encode_images
    monkeypatch.setattr(
        caching, "encode_images", lambda vae, px, seeds: encoded.append(len(seeds)) or real_encode(vae, px, seeds)
    )
    other = _prepared(tiny_model_cfg, cache, instance_data_dir=str(data), resolution=32)
    assert sum(encoded) == 3 and other.train_dataset[(0, 0)]["latents"].shape == (16, 4, 4)
    encoded.clear()
    _image(data / "img0.png", colour=(1, 2, 3))  # same name, new content
    _prepared(tiny_model_cfg, cache, instance_data_dir=str(data))
    assert sum(encoded) == 1


def test_random_crop_is_fixed_per_file_and_keyed(tiny_model_cfg, tmp_path):
    _image(tmp_path / "d" / "wide.png", size=(256, 64))
    kw = dict(instance_data_dir=str(tmp_path / "d"), crop_style="random")
    a = make_datamodule(tiny_model_cfg, tmp_path, **kw).samples()[0]
    b = make_datamodule(tiny_model_cfg, tmp_path, **kw).samples()[0]
    c = make_datamodule(tiny_model_cfg, tmp_path, **{**kw, "crop_style": "center"}).samples()[0]
    assert a.placement == b.placement and a.latent_key == b.latent_key
    assert c.placement.box == (96, 0, 160, 64)
    assert (a.latent_key == c.latent_key) == (a.placement == c.placement)


def test_caption_dropout_is_deterministic_per_epoch(tiny_model_cfg, cache_root):
    dm = _prepared(tiny_model_cfg, cache_root, demo_images=6, caption_dropout_probability=0.5)
    empty = dm.prompt_embedding("")["prompt_embeds"]
    ds = dm.train_dataset
    drops = lambda epoch: [torch.equal(ds[(epoch, i)]["prompt_embeds"], empty) for i in range(len(ds))]
    assert drops(0) == drops(0)
    assert any(drops(e) for e in range(5)) and not all(all(drops(e)) for e in range(5))
    assert drops(0) != drops(1) or drops(1) != drops(2)


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    cache = TensorCache(tmp_path)
    import safetensors.torch as st

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.save("ab" * 32, {"x": torch.ones(2)})
    assert "ab" * 32 not in cache
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    cache.save("ab" * 32, {"x": torch.ones(2)})
    assert torch.equal(cache.load("ab" * 32)["x"], torch.ones(2))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_image_modes_become_rgb(tmp_path, mode):
    from flux_lightning.data.transforms import load_rgb

    Image.new(mode, (20, 20)).save(tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg")
    im = load_rgb(next(tmp_path.iterdir()))
    assert im.mode == "RGB" and np.asarray(im).shape == (20, 20, 3)
