"""The tiny flavour is a real diffusers Flux folder, and every flavour loads through one path."""

import os
import subprocess
import time

import pytest
import torch
from diffusers import FluxPipeline

from flux_lightning.model.components import (
    ModelConfig,
    ModelSourceError,
    check_source,
    load_text_encoders,
    load_transformer,
    load_vae,
)
from flux_lightning.model.tiny import build_tiny_pipeline

from ..support.cli import flux_lightning


def test_tiny_folder_loads_in_diffusers_and_generates(tiny_folder):
    pipe = FluxPipeline.from_pretrained(tiny_folder)
    assert pipe.transformer.config.in_channels == 64
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)
    assert pipe.vae_scale_factor == 8
    image = pipe(
        "a red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


def test_tiny_build_is_deterministic_and_seeded():
    a, b, c = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_tiny_tokenizers_are_real_clip_and_t5_style(tiny_folder):
    parts = load_text_encoders(ModelConfig(pretrained_model_name_or_path=str(tiny_folder)))
    # the real CLIP BPE ids of "a photo of a cat"
    assert parts["tokenizer"]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    t5 = parts["tokenizer_2"]("a red circle on a white background")
    assert t5.input_ids[-1] == parts["tokenizer_2"].eos_token_id == 1
    assert parts["tokenizer_2"].unk_token_id not in t5.input_ids
    assert parts["tokenizer_2"].decode(t5.input_ids, skip_special_tokens=True) == "a red circle on a white background"


def test_transformer_override_without_subfolder(tiny_folder, tmp_path):
    src = load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny_folder)))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    src.save_pretrained(tmp_path / "finetune")
    cfg = ModelConfig(
        pretrained_model_name_or_path=str(tiny_folder),
        pretrained_transformer_model_name_or_path=str(tmp_path / "finetune"),
        pretrained_transformer_subfolder="none",
    )
    loaded = load_transformer(cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), src.parameters()))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_vae_override_accepts_pipeline_folder(tiny_folder):
    cfg = ModelConfig(flavour="krea", pretrained_vae_model_name_or_path=str(tiny_folder))
    assert load_vae(cfg).config.latent_channels == 16


def test_check_source_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist.*pretrained_model_name_or_path"):
        check_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="model_index.json"):
        check_source(str(tmp_path / "empty"))


def test_unknown_flavour_is_named():
    with pytest.raises(ValueError, match="model.flavour='turbo'.*krea"):
        ModelConfig(flavour="turbo").spec


def test_krea_without_weights_or_hub_fails_fast_with_help(tmp_path):
    """A real `+experiment=krea_lora` process on a machine without the weights or hub access."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    start = time.monotonic()
    proc = subprocess.run(
        flux_lightning(
            "+experiment=krea_lora",
            f"paths.cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/run",
        ),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "black-forest-labs/FLUX.1-Krea-dev" in err
    assert "HF_TOKEN" in err and "license" in err
    assert "model.pretrained_model_name_or_path=<folder>" in err
    assert "Traceback" not in err
    assert elapsed < 60, elapsed  # seconds of Python start-up, no weight loading or long retries
