"""Multi-backend datasets: the seed's JSON, buckets end to end, regularisation, masks, resume, bad input."""

import importlib.util
import json
import logging
import os
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.config.validation import validate
from flux_lightning.data import DataError, DatasetConfig, FluxDataModule, caching
from flux_lightning.data.backend_file import load_backend_file
from flux_lightning.data.config import ImageBackendConfig
from flux_lightning.run.train import config_dir

from ..conftest import REPO

SEED_JSON = REPO / "examples" / "multibackend" / "multidatabackend.json"


def _img(path, size=(96, 64), colour=(200, 40, 40), **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    return path


def _backend(folder, **kw):
    kw.setdefault("id", "b")
    kw.setdefault("resolution", 64)
    return ImageBackendConfig(instance_data_dir=str(folder), **kw)


def _dm(model_cfg, cache, backends, **kw):
    kw.setdefault("caption_dropout_probability", 0.0)
    cfg = DatasetConfig(backends=backends, cache_dir=str(cache), **kw)
    dm = FluxDataModule(cfg, model_cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _make_seed_datasets(root):
    spec = importlib.util.spec_from_file_location("mk", REPO / "examples" / "multibackend" / "make_datasets.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    return mk.make(root, reg=4, subject=2)


@pytest.mark.slow
def test_seed_json_and_hydra_experiment_give_identical_batches_and_train(tiny_model_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _make_seed_datasets(tmp_path)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "+experiment=dreambooth_reg_tiny",
                f"paths.output_dir={tmp_path}/run",
                f"paths.cache_dir={tmp_path}/cache",
                f"model.cache_dir={tiny_model_cfg.cache_dir}",
            ],
        )
    run = validate(cfg)
    assert [b.id for b in run.dataset.image_backends()] == [
        "pseudo-camera-10k-flux",
        "dreambooth-subject",
        "dreambooth-subject-512",
    ]
    from_hydra = FluxDataModule(run.dataset, run.model)
    with caplog.at_level(logging.WARNING):
        from_json = FluxDataModule(
            DatasetConfig(backend_file=str(SEED_JSON), cache_dir=str(tmp_path / "cache"), seed=cfg.seed), run.model
        )
    assert "metadata_backend" not in caplog.text  # a key we know is accepted, not reported
    for dm in (from_hydra, from_json):
        dm.prepare_data()
        dm.setup("fit")
    buckets = {(s.backend, s.placement.bucket) for s in from_hydra.train_dataset.samples}
    assert ("dreambooth-subject", (1152, 896)) in buckets and ("dreambooth-subject", (896, 1152)) in buckets
    assert ("pseudo-camera-10k-flux", (512, 512)) in buckets
    a, b = iter(from_hydra.train_dataloader()), iter(from_json.train_dataloader())
    for _ in range(12):
        x, y = next(a), next(b)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)
    # and it trains: a few steps over the mixed 512/1024 batches
    from flux_lightning.run.train import train

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        short = compose("train", overrides=[*cfg_overrides(tmp_path, tiny_model_cfg), "trainer.max_steps=3"])
    assert np.isfinite(train(short))


def cfg_overrides(tmp_path, tiny_model_cfg):
    return [
        "+experiment=dreambooth_reg_tiny",
        f"paths.output_dir={tmp_path}/run",
        f"paths.cache_dir={tmp_path}/cache",
        f"model.cache_dir={tiny_model_cfg.cache_dir}",
        "callbacks.validation.before_training=false",
        "callbacks.validation.validation_resolution=64x64",
    ]


def test_backend_file_errors_are_named(tiny_model_cfg, tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        FluxDataModule(DatasetConfig(backend_file=str(bad)), tiny_model_cfg)
    bad.write_text(json.dumps([{"id": "x", "type": "s3", "instance_data_dir": str(tmp_path)}]))
    with pytest.raises(DataError, match=r"dataset.backends\[x\].type: 's3' is not supported"):
        FluxDataModule(DatasetConfig(backend_file=str(bad)), tiny_model_cfg)


def test_too_small_backend_names_the_fix(tiny_model_cfg, tmp_path):
    _img(tmp_path / "one" / "a.png")
    with pytest.raises(
        DataError, match=r"no images detected in backend 'solo'.*raise dataset.backends\[solo\].repeats"
    ):
        _dm(tiny_model_cfg, tmp_path / "c", [_backend(tmp_path / "one", id="solo")], batch_size=2).train_dataloader()
    dm = _dm(tiny_model_cfg, tmp_path / "c", [_backend(tmp_path / "one", id="solo", repeats=3)], batch_size=2)
    assert len(dm.train_dataloader()) == 2


def test_same_folder_at_two_resolutions_shares_text_and_splits_latents(tiny_model_cfg, tmp_path):
    for i, size in enumerate([(128, 64), (64, 128), (96, 96)]):
        _img(tmp_path / "d" / f"img {i}.png", size=size, colour=(30 * i, 90, 160))
    dm = _dm(
        tiny_model_cfg,
        tmp_path / "c",
        [_backend(tmp_path / "d", id="lo", resolution=64), _backend(tmp_path / "d", id="hi", resolution=128)],
    )
    buckets = {(s.backend, s.placement.bucket) for s in dm.train_dataset.samples}
    assert ("lo", (64, 64)) in buckets and ("hi", (192, 64)) in buckets and ("hi", (64, 192)) in buckets
    for batch in dm.train_dataloader():
        assert batch["latents"].shape[-2:] in {(8, 8), (8, 24), (24, 8), (16, 16)}


def test_regularisation_target_is_the_base_prediction(tiny_model_cfg, tmp_path):
    _img(tmp_path / "reg" / "a photo.png", size=(64, 64))
    _img(tmp_path / "reg" / "b photo.png", size=(64, 64), colour=(1, 2, 3))
    dm = _dm(
        tiny_model_cfg,
        tmp_path / "c",
        [_backend(tmp_path / "reg", id="reg", is_regularisation_data=True)],
        batch_size=2,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_regularisation"].all()
    module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=2, dropout=0.0))  # B = 0: adapter is a no-op
    module.configure_model()
    assert module.training_step(batch, 0).item() == 0.0
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert module.training_step(batch, 0).item() > 0.0
    plain = {k: v for k, v in batch.items() if k != "is_regularisation"}
    assert module.training_step(plain, 0).item() > 0.1  # the ordinary flow target


def test_masks_link_by_name_and_restrict_the_loss(tiny_model_cfg, tmp_path):
    _img(tmp_path / "img" / "cat.png", size=(64, 64))
    _img(tmp_path / "img" / "dog.png", size=(64, 64), colour=(0, 90, 0))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # left half trains
    for name in ("cat", "dog"):
        (tmp_path / "mask").mkdir(exist_ok=True)
        Image.fromarray(mask).save(tmp_path / "mask" / f"{name}.png")
    backends = [
        _backend(tmp_path / "img", id="img", conditioning_data="masks"),
        _backend(tmp_path / "mask", id="masks", dataset_type="conditioning"),
    ]
    dm = _dm(tiny_model_cfg, tmp_path / "c", backends, batch_size=2)
    assert len(dm.train_dataset) == 2  # the mask backend is not trained on
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (2, 1, 8, 8)
    assert torch.equal(batch["mask"][:, :, :, :4], torch.ones(2, 1, 8, 4)) and batch["mask"][:, :, :, 4:].sum() == 0

    module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=2, dropout=0.0))
    module.configure_model()
    outputs = []
    real_forward = module.forward
    for poison in (False, True):

        def forward(*a, poison=poison, **k):
            out = real_forward(*a, **k)
            if poison:  # change the prediction only where the mask is black
                out = out.clone()
                out[..., 4:] += 100.0
            return out

        module.forward = forward
        torch.manual_seed(0)
        outputs.append(module.training_step(batch, 0).item())
    assert outputs[0] == pytest.approx(outputs[1], rel=1e-6)


def test_missing_mask_is_skipped_with_a_warning(tiny_model_cfg, tmp_path, caplog):
    _img(tmp_path / "img" / "a.png", size=(64, 64))
    _img(tmp_path / "img" / "b.png", size=(64, 64))
    _img(tmp_path / "mask" / "a.png", size=(64, 64), colour=(255, 255, 255))
    backends = [
        _backend(tmp_path / "img", id="img", conditioning_data="m", repeats=1),
        _backend(tmp_path / "mask", id="m", dataset_type="conditioning"),
    ]
    with caplog.at_level(logging.WARNING):
        dm = _dm(tiny_model_cfg, tmp_path / "c", backends)
    assert len(dm.train_dataset) == 1 and dm.skipped == 1 and "b.png" in caplog.text


def test_changing_crop_reencodes_only_that_backend_and_never_serves_stale(tiny_model_cfg, tmp_path, monkeypatch):
    for i in range(2):
        _img(tmp_path / "d" / f"{i}.png", size=(160, 64), colour=(100 * i, 0, 0))
    _img(tmp_path / "e" / "x.png", size=(64, 64))
    encoded = []
    real = caching.encode_images
    monkeypatch.setattr(caching, "encode_images", lambda v, px, seeds: encoded.append(len(seeds)) or real(v, px, seeds))
    make = lambda style: [
        _backend(tmp_path / "d", id="d", crop=True, crop_style=style),
        _backend(tmp_path / "e", id="e", crop=True),
    ]
    first = _dm(tiny_model_cfg, tmp_path / "c", make("center"))
    assert sum(encoded) == 3
    encoded.clear()
    second = _dm(tiny_model_cfg, tmp_path / "c", make("corner"))
    assert sum(encoded) == 2  # only backend d's two images
    a = {s.path.name: s for s in first.train_dataset.samples}
    b = {s.path.name: s for s in second.train_dataset.samples}
    assert a["0.png"].latent_key != b["0.png"].latent_key and a["x.png"].latent_key == b["x.png"].latent_key


def test_a_run_killed_mid_caching_is_completed_next_time(tiny_model_cfg, tmp_path, monkeypatch):
    for i in range(6):
        _img(tmp_path / "d" / f"{i}.png", size=(64, 64), colour=(40 * i, 0, 0))
    calls = []
    real = caching.encode_images

    def dies_on_second_batch(v, px, seeds):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(v, px, seeds)

    monkeypatch.setattr(caching, "encode_images", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _dm(tiny_model_cfg, tmp_path / "c", [_backend(tmp_path / "d", crop=True)], vae_batch_size=2)
    written = list((tmp_path / "c" / "vae").rglob("*.safetensors"))
    assert len(written) == 2 and not list((tmp_path / "c").rglob("*.tmp"))
    monkeypatch.setattr(caching, "encode_images", lambda v, px, seeds: calls.append(len(seeds)) or real(v, px, seeds))
    calls.clear()
    dm = _dm(tiny_model_cfg, tmp_path / "c", [_backend(tmp_path / "d", crop=True)], vae_batch_size=2)
    assert sum(calls) == 4 and len(dm.train_dataset) == 6


def test_resume_mid_epoch_continues_with_the_next_batch(tiny_model_cfg, tmp_path):
    for i in range(8):
        _img(tmp_path / "d" / f"{i}.png", size=(64, 64), colour=(30 * i, 10 * i, 0))

    class Record(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.append(round(batch["latents"].sum().item(), 4))

    def run(steps, ckpt=None, save_at=None):
        L.seed_everything(0)
        dm = FluxDataModule(
            DatasetConfig(
                backends=[_backend(tmp_path / "d", crop=True)],
                cache_dir=str(tmp_path / "c"),
                batch_size=2,
                caption_dropout_probability=0.0,
            ),
            tiny_model_cfg,
        )
        module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=2), optimizer=partial(torch.optim.SGD, lr=0.0))
        rec = Record()
        cbs = [rec]
        if save_at:
            cbs.append(
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=tmp_path / "ck", every_n_train_steps=save_at, save_top_k=-1, filename="{step}"
                )
            )
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=cbs,
            enable_checkpointing=bool(save_at),
        )
        trainer.fit(module, dm, ckpt_path=ckpt)
        return rec.seen

    full = run(7, save_at=3)  # 4 batches per epoch: resume at step 3 is mid-epoch
    resumed = run(7, ckpt=str(tmp_path / "ck" / "step=3.ckpt"))
    assert resumed == full[3:]


# -- bad input: each file is used correctly or skipped with a warning naming it and the reason --------


def _bad_input_folder(root):
    d = root / "data"
    _img(d / "plain.png", size=(64, 64))
    Image.new("L", (64, 64), 128).save(d / "gray.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(d / "rgba.png")
    Image.new("P", (64, 64)).save(d / "palette.png")
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(d / "sixteen.png")
    rot = Image.new("RGB", (128, 64), (9, 9, 9))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90: upright it is 64 wide, 128 tall
    rot.save(d / "rotated.jpg", exif=exif)
    _img(d / "ünïcødé name with spaces.png", size=(64, 64))
    _img(d / "tiny.png", size=(16, 16))  # below minimum_image_size
    _img(d / "huge.png", size=(300, 300))  # above max_image_pixels in this test
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("not an image at all")
    trunc = _img(d / "truncated.png", size=(64, 64))
    trunc.write_bytes(trunc.read_bytes()[:100])
    os.symlink(d / "loop.png", d / "loop.png")
    sub = d / "sub"
    sub.mkdir()
    os.symlink(d, sub / "back")  # a folder loop; not followed
    return d


def test_every_bad_input_is_used_or_skipped_with_its_reason(tiny_model_cfg, tmp_path, caplog):
    d = _bad_input_folder(tmp_path)
    backend = _backend(d, id="bad", minimum_image_size=32, resolution_type="pixel", repeats=1)
    with caplog.at_level(logging.WARNING):
        dm = _dm(tiny_model_cfg, tmp_path / "c", [backend], max_image_pixels=200 * 200)
    used = {s.path.name for s in dm.train_dataset.samples}
    assert used == {
        "plain.png",
        "gray.png",
        "rgba.png",
        "palette.png",
        "cmyk.jpg",
        "sixteen.png",
        "rotated.jpg",
        "ünïcødé name with spaces.png",
    }
    for name, reason in [
        ("tiny.png", "minimum_image_size"),
        ("huge.png", "max_image_pixels"),
        ("zero.png", "cannot read image"),
        ("text.png", "cannot read image"),
        ("truncated.png", "cannot"),
        ("loop.png", "cannot read image"),
    ]:
        assert any(name in r.message and reason in r.message for r in caplog.records), name
    assert dm.skipped == 6
    rotated = next(s for s in dm.train_dataset.samples if s.path.name == "rotated.jpg")
    assert rotated.size == (64, 128) and rotated.placement.bucket == (64, 128)
    sixteen = next(s for s in dm.train_dataset.samples if s.path.name == "sixteen.png")
    from flux_lightning.data.transforms import load_rgb

    assert np.asarray(load_rgb(sixteen.path)).mean() == pytest.approx(40000 / 65535 * 255, abs=1)


def test_empty_caption_is_skipped_and_textfile_captions_are_used(tiny_model_cfg, tmp_path, caplog):
    d = tmp_path / "d"
    for name, text in [("a", "a caption"), ("b", "   "), ("c", None)]:
        _img(d / f"{name}.png", size=(64, 64))
        if text is not None:
            (d / f"{name}.txt").write_text(text)
    with caplog.at_level(logging.WARNING):
        dm = _dm(tiny_model_cfg, tmp_path / "c", [_backend(d, caption_strategy="textfile", repeats=1)])
    assert [s.caption for s in dm.train_dataset.samples] == ["a caption"]
    assert "b.png: empty caption" in caplog.text and "c.txt is missing" in caplog.text


def test_csv_metadata_captions(tiny_model_cfg, tmp_path):
    d = tmp_path / "d"
    _img(d / "x.png", size=(64, 64))
    _img(d / "sub" / "y.png", size=(64, 64))
    (d / "metadata.csv").write_text("filename,caption\nx.png,an x\nsub/y.png,a y\n")
    dm = _dm(tiny_model_cfg, tmp_path / "c", [_backend(d, caption_strategy="csv")], batch_size=1)
    assert sorted(s.caption for s in dm.train_dataset.samples) == ["a y", "an x"]


def test_us_spelling_is_regularization_data_is_accepted_in_json_and_hydra(tmp_path, caplog):
    """SimpleTuner reads ``is_regularization_data`` as well as ``is_regularisation_data``; so do we."""
    (tmp_path / "reg").mkdir()
    doc = [{"id": "reg", "instance_data_dir": str(tmp_path / "reg"), "resolution": 64, "is_regularization_data": True}]
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        (backend,), _ = load_backend_file(tmp_path / "m.json")
    assert backend.is_regularisation_data and "is_regularization_data" not in caplog.text
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "dataset=multibackend",
                f"paths.cache_dir={tmp_path}/cache",
                "dataset.backends=[{id:reg,instance_data_dir:x,resolution:64,is_regularization_data:true},"
                "{id:subject,instance_data_dir:y,resolution:64}]",
            ],
        )
    run = validate(cfg, check_sources=False)
    assert [b.is_regularisation_data for b in run.dataset.backends] == [True, False]
    clash = ImageBackendConfig(id="r", instance_data_dir="x", is_regularisation_data=True, is_regularization_data=False)
    assert any("is_regularization_data" in p and "disagree" in p for p in clash.problems())
