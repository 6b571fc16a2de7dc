"""Validation images: settings, flavour behaviour, isolation from training, and parity with diffusers."""

from __future__ import annotations

import json
import random
from functools import partial
from types import SimpleNamespace

import diffusers
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from flux_lightning import AdapterConfig, DatasetConfig, FluxDataModule, FluxLoRAModule, ModelConfig
from flux_lightning.callbacks import AdapterExport, EvalLoss, ValidationImages
from flux_lightning.callbacks.validation import parse_resolutions, prompt_library
from flux_lightning.config.validation import ConfigError
from flux_lightning.model.flavours import FLAVOURS


def test_prompt_library_replaces_token_and_merges_the_validation_prompt(tmp_path):
    lib = tmp_path / "lib.json"
    lib.write_text(json.dumps({"<token>_portrait": "a portrait of <token>", "plain": "a red circle"}))
    prompts = prompt_library("<token> on a beach", str(lib), "sks dog")
    assert prompts == {
        "validation": "sks dog on a beach",
        "sks dog_portrait": "a portrait of sks dog",
        "plain": "a red circle",
    }
    lib.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="user_prompt_library: .* must be a JSON object"):
        prompt_library(None, str(lib), None)
    with pytest.raises(ConfigError, match="user_prompt_library: cannot read"):
        prompt_library(None, str(tmp_path / "missing.json"), None)


def test_resolutions_parse_and_bad_ones_name_the_field():
    assert parse_resolutions("1024x1024, 1280x768") == [(1024, 1024), (1280, 768)]
    assert parse_resolutions(512) == [(512, 512)]
    with pytest.raises(ConfigError, match="validation_resolution: '1000x1000' must have positive sides"):
        parse_resolutions("1000x1000")
    with pytest.raises(ConfigError, match="validation_resolution: 'big' is not WIDTHxHEIGHT"):
        parse_resolutions("big")


def test_sampling_settings_honour_the_flavour(tmp_path):
    cb = ValidationImages(str(tmp_path), validation_prompt="x")
    assert cb.sampling(FLAVOURS["schnell"]) == {"num_inference_steps": 4, "guidance_scale": 0.0, "true_cfg_scale": 1.0}
    assert cb.sampling(FLAVOURS["fluxbooru"]) == {
        "num_inference_steps": 28,
        "guidance_scale": 3.0,
        "true_cfg_scale": 4.0,
    }
    assert cb.sampling(FLAVOURS["libreflux"])["true_cfg_scale"] == 4.0
    assert cb.sampling(FLAVOURS["krea"])["guidance_scale"] == 4.5
    explicit = ValidationImages(
        str(tmp_path),
        validation_prompt="x",
        validation_num_inference_steps=3,
        validation_guidance=2.0,
        validation_guidance_real=1.5,
    )
    assert explicit.sampling(FLAVOURS["schnell"]) == {
        "num_inference_steps": 3,
        "guidance_scale": 2.0,
        "true_cfg_scale": 1.5,
    }
    assert FLAVOURS["kontext"].validation_pipeline == "FluxKontextPipeline"
    assert all(hasattr(diffusers, spec.validation_pipeline) for spec in FLAVOURS.values())


# -- helpers for rendering without a Trainer ------------------------------------------------------
def _module(model_cfg, **adapter):
    module = FluxLoRAModule(model_cfg, AdapterConfig(rank=4, init="gaussian", **adapter))
    module.configure_model()
    return module


def _fake_trainer(embeddings: dict, step: int = 0, callbacks=()):
    datamodule = SimpleNamespace(prompt_embedding=lambda text: embeddings[text])
    return SimpleNamespace(
        global_step=step, is_global_zero=True, datamodule=datamodule, loggers=[], callbacks=list(callbacks)
    )


def _random_embeddings(texts, length=16, width=32):
    g = torch.Generator().manual_seed(1)
    return {
        t: {
            "prompt_embeds": torch.randn(length, width, generator=g),
            "pooled_prompt_embeds": torch.randn(width, generator=g),
        }
        for t in texts
    }


def test_a_round_restores_rng_and_train_mode_exactly(tiny_model_cfg, tmp_path):
    module = _module(tiny_model_cfg, dropout=0.1)
    module.transformer.train()
    module.transformer.transformer_blocks[0].eval()  # a mixed state must come back as it was
    flags = [m.training for m in module.transformer.modules()]
    cb = ValidationImages(str(tmp_path), validation_prompt="a red circle", validation_resolution=32)
    trainer = _fake_trainer(_random_embeddings(cb.prompt_texts()))
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    records = cb.generate(trainer, module)
    assert [r.path.name for r in records] == ["validation_32x32.png"]
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert [m.training for m in module.transformer.modules()] == flags


def test_a_bf16_base_renders_its_validation_images(tiny_model_cfg, tmp_path):
    """``+experiment=krea_lora`` holds the base in bf16 (``model.dtype: bf16``): the pipeline's
    latents are bf16, so the VAE that decodes them must be too (it was fp32: a dtype error at the
    first validation round, found running the experiment on a local folder)."""
    from dataclasses import replace

    module = _module(replace(tiny_model_cfg, dtype="bf16"))
    assert module.compute_dtype == torch.bfloat16
    cb = ValidationImages(str(tmp_path), validation_prompt="a red circle", validation_resolution=32)
    records = cb.generate(_fake_trainer(_random_embeddings(cb.prompt_texts())), module)
    assert [r.path.name for r in records] == ["validation_32x32.png"] and records[0].path.is_file()


def test_kontext_flavour_renders_with_the_kontext_pipeline(tiny_folder, tmp_path):
    model_cfg = ModelConfig(flavour="kontext", pretrained_model_name_or_path=str(tiny_folder))
    module = _module(model_cfg)
    reference = tmp_path / "reference.png"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(reference)
    cb = ValidationImages(
        str(tmp_path / "val"),
        validation_prompt="make it blue",
        validation_resolution="48x32",
        validation_num_inference_steps=2,
        validation_reference_image=str(reference),
    )
    assert isinstance(cb._pipeline(module), diffusers.FluxKontextPipeline)
    records = cb.generate(_fake_trainer(_random_embeddings(cb.prompt_texts())), module)
    assert records[0].image.size == (48, 32)
    assert (tmp_path / "val" / "step_0" / "validation_48x32.png").is_file()


# -- with a Trainer ---------------------------------------------------------------------------------
def _fit(model_cfg, cache_root, callbacks=(), *, prompts=(), steps=4, eval_data_dir=None, loggers=False):
    """A short, fully seeded tiny run with adapter dropout on (so stray RNG draws would show)."""
    L.seed_everything(0)
    data = FluxDataModule(
        DatasetConfig(
            resolution=64,
            batch_size=2,
            cache_dir=str(cache_root),
            caption_dropout_probability=0.2,
            eval_data_dir=eval_data_dir,
        ),
        model_cfg,
        prompts=prompts,
    )
    data.prepare_data()  # caches first, so both runs start from the same RNG state
    L.seed_everything(0)
    module = FluxLoRAModule(
        model_cfg, AdapterConfig(rank=4, dropout=0.1), optimizer=partial(torch.optim.AdamW, lr=1e-3)
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, data)
    return module


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    from flux_lightning.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("evaldata"), count=2, size=128, seed=5)


def test_validation_and_eval_on_or_off_give_identical_lora_weights(tiny_model_cfg, cache_root, tmp_path, eval_folder):
    validation = ValidationImages(
        str(tmp_path / "val"),
        validation_prompt="a red circle",
        every_n_steps=2,
        validation_resolution="32x32,48x32",
        validation_guidance_real=2.0,
        validation_negative_prompt="blurry",
    )
    evaluation = EvalLoss(every_n_steps=1)
    with_callbacks = _fit(
        tiny_model_cfg,
        cache_root,
        [validation, evaluation],
        prompts=validation.prompt_texts(),
        eval_data_dir=str(eval_folder),
    )
    plain = _fit(tiny_model_cfg, cache_root)
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["step_0", "step_2", "step_4"]
    assert sorted(evaluation.history) == [0, 1, 2, 3, 4]
    a, b = with_callbacks.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert with_callbacks.transformer.training


@pytest.mark.slow
def test_final_images_equal_diffusers_with_the_exported_lora(tiny_model_cfg, tiny_folder, cache_root, tmp_path):
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"circle": "a red circle", "star": "a <token> star"}))
    common = dict(
        user_prompt_library=str(library),
        instance_prompt="yellow",
        validation_resolution="64x64,96x64",
        validation_num_inference_steps=4,
        validation_seed=3,
        before_training=False,
    )
    plain = ValidationImages(str(tmp_path / "plain"), validation_guidance=3.0, **common)
    cfg = ValidationImages(
        str(tmp_path / "cfg"),
        validation_guidance=2.0,
        validation_guidance_real=3.0,
        validation_negative_prompt="blurry",
        **common,
    )
    export = AdapterExport(str(tmp_path / "lora"), dtype="fp32")
    export_bf16 = AdapterExport(str(tmp_path / "lora_bf16"))  # the default dtype
    _fit(
        tiny_model_cfg,
        cache_root,
        [plain, cfg, export, export_bf16],
        prompts=plain.prompt_texts() + cfg.prompt_texts(),
        steps=3,
    )
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/step_*/*.png"))
    assert files == [
        f"{d}/step_3/{n}_{s}.png" for d in ("cfg", "plain") for n in ("circle", "star") for s in ("64x64", "96x64")
    ]

    data = FluxDataModule(DatasetConfig(resolution=64, cache_dir=str(cache_root)), tiny_model_cfg)

    def embeds(text, prefix=""):
        e = data.prompt_embedding(text)
        return {
            f"{prefix}prompt_embeds": e["prompt_embeds"][None],
            f"{prefix}pooled_prompt_embeds": e["pooled_prompt_embeds"][None],
        }

    def worst_difference(lora_dir) -> int:
        # What a user does: the pipeline from the folder, the LoRA from the file, the same embeddings.
        pipe = diffusers.FluxPipeline.from_pretrained(str(tiny_folder))
        pipe.load_lora_weights(str(lora_dir))
        pipe.set_progress_bar_config(disable=True)
        worst = 0
        for cb, extra in ((plain, {}), (cfg, {"true_cfg_scale": 3.0, **embeds("blurry", "negative_")})):
            for record in cb.last_records:
                image = pipe(
                    **embeds(record.prompt),
                    **extra,
                    height=record.height,
                    width=record.width,
                    num_inference_steps=4,
                    guidance_scale=cb.guidance,
                    generator=torch.Generator().manual_seed(3),
                ).images[0]
                ours = np.asarray(Image.open(record.path), dtype=np.int16)
                worst = max(worst, int(np.abs(ours - np.asarray(image, dtype=np.int16)).max()))
        return worst

    # fp32 file: bit-identical (this also needs lora_dropout=0 in the file: diffusers leaves the
    # injected LoRA layers in train mode, so a dropout > 0 would be applied at inference).
    assert worst_difference(tmp_path / "lora") == 0
    assert worst_difference(tmp_path / "lora_bf16") <= 1
    # and the true-CFG images really are different images
    a = np.asarray(Image.open(tmp_path / "plain/step_3/circle_64x64.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "cfg/step_3/circle_64x64.png"), dtype=np.int16)
    assert np.abs(a - b).max() > 1


def test_grids_go_to_tensorboard_and_to_loggers_with_log_image(tiny_model_cfg, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    calls = []
    wandb_like = SimpleNamespace(log_image=lambda **kw: calls.append(kw))
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version="")
    module = _module(tiny_model_cfg)
    cb = ValidationImages(
        str(tmp_path / "val"),
        validation_prompt="a red circle",
        validation_resolution="32x32,48x32",
        validation_num_inference_steps=2,
    )
    trainer = _fake_trainer(_random_embeddings(cb.prompt_texts()), step=4)
    trainer.loggers = [tensorboard, wandb_like]
    cb.generate(trainer, module)
    (call,) = calls
    assert call["key"] == "validation/images" and call["step"] == 4 and len(call["images"]) == 2
    assert call["caption"] == ["validation 32x32", "validation 48x32"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (image,) = events.Images("validation/images")
    assert image.step == 4 and (image.width, image.height) == (2 + 2 * (32 + 2), 2 + 32 + 2)  # one row, two columns


def test_bad_callback_settings_fail_at_start_with_one_line(tmp_path):
    from hydra import compose, initialize_config_dir

    from flux_lightning.run.train import _instantiate_all, config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"paths.output_dir={tmp_path}", "callbacks.validation.validation_resolution=100x64"]
        )
        with pytest.raises(ConfigError, match="callbacks.validation.validation_resolution: '100x64'"):
            _instantiate_all(cfg.callbacks)
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "callbacks.adapter_export.dtype=int3"])
        with pytest.raises(ConfigError, match="callbacks.adapter_export.dtype='int3' is unknown"):
            _instantiate_all(cfg.callbacks)
