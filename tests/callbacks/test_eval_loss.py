"""Stable eval loss: the held-out split, the sigma grid, reproducibility and isolation from training."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.callbacks import EvalLoss
from flux_lightning.callbacks.eval_loss import sigma_grid, stable_eval_loss
from flux_lightning.config.validation import ConfigError
from flux_lightning.data.discovery import DataError
from flux_lightning.data.holdout import holdout_count, select_holdout, split_sources
from flux_lightning.training.flow import TimestepConfig, auto_shift, shift_like_training, shift_sigmas

from ..support.cli import flux_lightning


def test_holdout_is_deterministic_sized_and_order_free():
    keys = [f"{i:064x}" for i in range(20)]
    held = select_holdout(keys, 0.1)
    assert len(held) == 2 and held == select_holdout(list(reversed(keys)), 0.1)
    assert select_holdout(keys, 0.0) == set()
    assert holdout_count(3, 0.01) == 1 and holdout_count(3, 0.9) == 2
    with pytest.raises(DataError, match="dataset.eval_fraction=0.5 needs at least 2 images"):
        holdout_count(1, 0.5)


def test_eval_split_is_never_trained_on(tiny_model_cfg, cache_root):
    dm = make_datamodule(tiny_model_cfg, cache_root, eval_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    train = {s.latent_key for s in dm.train_dataset.samples}
    held = [s.latent_key for s in dm.eval_dataset.samples]
    assert len(held) == 4 and len(train) == 12 and not train & set(held)
    again = make_datamodule(tiny_model_cfg, cache_root, eval_fraction=0.25)
    again.setup("fit")
    assert [s.latent_key for s in again.eval_dataset.samples] == held
    batch = next(iter(dm.eval_dataloader()))
    assert batch["latents"].shape == (2, 16, 8, 8) and batch["backend"] == ["demo", "demo"]


def make_datamodule(model_cfg, cache_root, eval_fraction=0.0, eval_data_dir=None, eval_min_images=0):
    """The 16-image demo; ``eval_min_images=0`` lets even this small dataset give images to the split."""
    from flux_lightning import DatasetConfig, FluxDataModule

    cfg = DatasetConfig(
        resolution=64,
        batch_size=2,
        cache_dir=str(cache_root),
        caption_dropout_probability=0.5,
        eval_fraction=eval_fraction,
        eval_data_dir=eval_data_dir,
        eval_min_images=eval_min_images,
    )
    return FluxDataModule(cfg, model_cfg)


def test_sigma_grid_is_spread_over_the_unit_interval_and_shifted_like_training():
    grid = sigma_grid(8)
    assert torch.allclose(grid, torch.tensor([1, 3, 5, 7, 9, 11, 13, 15], dtype=torch.float64) / 16)
    g = grid.float()
    assert torch.equal(shift_like_training(g, TimestepConfig(), 256), g)
    assert torch.allclose(shift_like_training(g, TimestepConfig(flow_schedule_shift=3.0), 256), shift_sigmas(g, 3.0))
    auto = TimestepConfig(flow_schedule_auto_shift=True)
    assert torch.allclose(shift_like_training(g, auto, 1024), shift_sigmas(g, auto_shift(1024)))
    assert torch.equal(shift_like_training(g, TimestepConfig(weighting="schnell_fast"), 1024), g)


@pytest.fixture(scope="module")
def eval_data(tiny_model_cfg, cache_root):
    dm = make_datamodule(tiny_model_cfg, cache_root, eval_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _module(model_cfg, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    m = FluxLoRAModule(model_cfg, AdapterConfig(rank=4, dropout=dropout, init="gaussian"))
    m.configure_model()
    with torch.no_grad():  # a non-zero B so the adapter matters
        for name, p in m.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return m.train()


def _trainer(datamodule, logged):
    logger = SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m)), save=lambda: None)
    return SimpleNamespace(global_step=0, datamodule=datamodule, loggers=[logger], callback_metrics={})


def test_same_weights_same_number_and_training_untouched(tiny_model_cfg, eval_data):
    module = _module(tiny_model_cfg, dropout=0.5)
    logged = []
    trainer = _trainer(eval_data, logged)
    cb = EvalLoss(num_sigmas=4, seed=3)
    torch.manual_seed(11), random.seed(11)
    states = torch.get_rng_state(), random.getstate()
    first = cb.evaluate(trainer, module)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert module.transformer.training  # back in train mode
    assert trainer.callback_metrics["loss/val"].item() == pytest.approx(first.loss)
    trainer.global_step = 1
    second = cb.evaluate(trainer, module)
    assert abs(first.loss - second.loss) < 1e-6 and first.per_sigma == second.per_sigma
    # dropout is off: the same weights without dropout give the same number
    plain = _module(tiny_model_cfg, dropout=0.0)
    plain.load_state_dict(module.state_dict())
    assert abs(cb.evaluate(SimpleNamespace(**{**vars(trainer), "global_step": 2}), plain).loss - first.loss) < 1e-6
    # other weights give another number
    assert (
        abs(
            cb.evaluate(SimpleNamespace(**{**vars(trainer), "global_step": 3}), _module(tiny_model_cfg, seed=1)).loss
            - first.loss
        )
        > 1e-4
    )
    step, metrics = logged[0]
    assert (
        step == 0
        and metrics["loss/val"] == first.loss
        and metrics["loss/val/backend/demo"] == pytest.approx(first.loss)
    )
    assert sorted(k for k in metrics if "/sigma/" in k) == [
        f"loss/val/sigma/{u:.3f}" for u in (0.125, 0.375, 0.625, 0.875)
    ]


def test_value_is_the_flow_matching_loss_on_the_grid(tiny_model_cfg, eval_data):
    module = _module(tiny_model_cfg).eval()
    timesteps = TimestepConfig(flow_schedule_shift=3.0)
    module.timesteps = timesteps
    loader = eval_data.eval_dataloader(batch_size=4)
    result = stable_eval_loss(module, loader, num_sigmas=2, seed=5)
    batch = next(iter(eval_data.eval_dataloader(batch_size=4)))
    x0 = batch["latents"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    losses = []
    with torch.no_grad():
        for u in (0.25, 0.75):
            s = 3 * u / (1 + 2 * u)
            sig = torch.full((x0.shape[0],), s)
            pred = module((1 - s) * x0 + s * noise, sig, batch["prompt_embeds"], batch["pooled_prompt_embeds"])
            losses.append(((pred - (noise - x0)) ** 2).mean().item())
    assert result.per_sigma[0.25] == pytest.approx(losses[0], rel=1e-5)
    assert result.per_sigma[0.75] == pytest.approx(losses[1], rel=1e-5)
    assert result.loss == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_settings_are_checked_early():
    from flux_lightning import DatasetConfig

    with pytest.raises(ConfigError, match="num_sigmas=0 must be >= 1"):
        EvalLoss(num_sigmas=0)
    problems = DatasetConfig(eval_fraction=1.5, eval_min_images=-1).problems()
    assert any("dataset.eval_fraction=1.5 must be within [0, 1)" in p for p in problems)
    assert any("dataset.eval_min_images=-1 must be >= 0" in p for p in problems)


def _compose(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from flux_lightning.run.train import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/c", *overrides]
        )


def test_the_split_settings_are_the_datasets(tmp_path):
    """``dataset.eval_*`` hold the split; the app holds out 0.1 while ``callbacks.eval_loss`` is on
    and nothing when it is null (as when the callback carried the settings), unless set."""
    from flux_lightning.config.validation import validate

    assert validate(_compose(tmp_path), check_sources=False).dataset.eval_fraction == 0.1
    assert validate(_compose(tmp_path, "callbacks.eval_loss=null"), check_sources=False).dataset.eval_fraction == 0.0
    chosen = validate(_compose(tmp_path, "callbacks.eval_loss=null", "dataset.eval_fraction=0.3"), check_sources=False)
    assert chosen.dataset.eval_fraction == 0.3
    with pytest.raises(
        ConfigError, match=r"callbacks.eval_loss needs dataset.eval_fraction > 0 or dataset.eval_data_dir"
    ):
        validate(_compose(tmp_path, "dataset.eval_fraction=0"), check_sources=False)
    with pytest.raises(
        ConfigError, match="callbacks.eval_loss.eval_min_images is now dataset.eval_min_images; move it there"
    ):
        validate(_compose(tmp_path, "+callbacks.eval_loss.eval_min_images=10"), check_sources=False)
    with pytest.raises(ConfigError, match="dataset.eval_data_dir: folder '/no/such/dir' does not exist"):
        validate(_compose(tmp_path, "dataset.eval_data_dir=/no/such/dir"))


def test_the_callback_finds_the_split_through_the_trainer(tiny_model_cfg, eval_data, caplog):
    """Any datamodule with ``eval_dataloader`` serves the callback; without one it warns once, with the reason."""
    import logging

    callback, logged = EvalLoss(num_sigmas=2), []
    module = _module(tiny_model_cfg)
    assert callback.evaluate(_trainer(eval_data, logged), module) is not None and logged
    with caplog.at_level(logging.WARNING):
        for datamodule in (
            None,
            SimpleNamespace(eval_split="off (no backend has >= 50 images)", eval_dataloader=lambda bs: None),
        ):
            fresh = EvalLoss()
            assert fresh.evaluate(_trainer(datamodule, []), module) is None
    assert "no eval split (off)" in caplog.text and "no eval split (off (no backend has >= 50 images))" in caplog.text


# -- the split never takes images from small datasets, and keeps every copy of a file on one side ----


def test_split_takes_only_from_large_backends_and_keeps_shared_files_in_training():
    big = {f"s{i}" for i in range(60)}
    held, large = split_sources({"big": big, "small": {"s0", "s1", "x"}}, 0.1, 50)
    assert large == ["big"] and len(held) == 6 and held <= big - {"s0", "s1"}
    assert split_sources({"a": {"x"}, "b": {f"y{i}" for i in range(49)}}, 0.1, 50) == (set(), [])
    assert split_sources({"big": big}, 0.0, 50)[0] == set()
    halves = {"big": big, "s1": {f"s{i}" for i in range(30)}, "s2": {f"s{i}" for i in range(30, 60)}}
    assert split_sources(halves, 0.1, 50) == (set(), ["big"])  # every image is also in a small backend
    # the same sources at two resolutions: one pool, so each file is held out (or not) in both
    held2, large2 = split_sources({"lo": big, "hi": big}, 0.1, 50)
    assert large2 == ["hi", "lo"] and held2 == held


def _images(folder, n, size=(64, 64)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(folder / f"img{i:03d}.png")
    return folder


def _folder_dm(model_cfg, tmp_path, backends):
    from flux_lightning import DatasetConfig, FluxDataModule

    cfg = DatasetConfig(
        backends=backends,
        cache_dir=str(tmp_path / "cache"),
        batch_size=1,
        caption_dropout_probability=0.0,
        eval_fraction=0.1,  # the app's default while the eval_loss callback is on
    )
    dm = FluxDataModule(cfg, model_cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_five_images_train_as_five(tiny_model_cfg, tmp_path):
    from flux_lightning.data.config import ImageBackendConfig

    folder = _images(tmp_path / "five", 5)
    dm = _folder_dm(
        tiny_model_cfg, tmp_path, [ImageBackendConfig(id="subject", instance_data_dir=str(folder), resolution=64)]
    )
    drawn = [dm.train_dataset.samples[i].path.name for batch in dm.train_dataloader().batch_sampler for _, i in batch]
    assert sorted(drawn) == [f"img{i:03d}.png" for i in range(5)]
    assert dm.eval_dataset is None and dm.eval_split == "off (no backend has >= 50 images)"


def test_two_resolutions_of_one_folder_hold_out_whole_files(tiny_model_cfg, tmp_path):
    from flux_lightning.data.config import ImageBackendConfig

    folder = _images(tmp_path / "subject", 60, size=(128, 128))
    backends = [
        ImageBackendConfig(id="subject-128", instance_data_dir=str(folder), resolution=128),
        ImageBackendConfig(id="subject-64", instance_data_dir=str(folder), resolution=64),
    ]
    dm = _folder_dm(tiny_model_cfg, tmp_path, backends)
    trained = {s.path for s in dm.train_dataset.samples}
    held = [s for s in dm.eval_dataset.samples]
    assert len({s.path for s in held}) == 6 and not trained & {s.path for s in held}
    assert sorted(s.backend for s in held) == ["subject-128"] * 6 + ["subject-64"] * 6  # both copies held out
    assert len(dm.train_dataset) == 2 * 54
    assert dm.eval_split == "6 images held out of 60 (backends subject-128, subject-64)"
    assert {b["backend"][0] for b in dm.eval_dataloader(batch_size=3)} == {"subject-128", "subject-64"}


@pytest.mark.slow
def test_one_image_dreambooth_run_with_default_callbacks_trains(tmp_path):
    import os
    import re
    import subprocess

    folder = _images(tmp_path / "one", 1)
    cmd = flux_lightning(
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "dataset=local",
        f"dataset.instance_data_dir={folder}",
        "dataset.resolution=64",
        "trainer.max_steps=2",
        "callbacks.validation=null",
        "callbacks.clip_score=null",
        "logger=csv",
    )
    run = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^steps\s+2$", run.stdout, re.M)
    assert re.search(r"^eval split\s+off \(no backend has >= 50 images\)$", run.stdout, re.M), run.stdout
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
