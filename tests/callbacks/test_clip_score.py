"""CLIP score: torchmetrics' CLIPScore on a tiny random CLIP saved locally, checked against CLIPModel."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flux_lightning.callbacks import CLIPScoreCallback
from flux_lightning.callbacks.clip_score import summarize
from flux_lightning.callbacks.validation import ValidationRecord
from flux_lightning.config.validation import ConfigError
from flux_lightning.model.tiny import build_tiny_clip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, tiny_folder) -> Path:
    from transformers import CLIPTokenizer

    # the tiny Flux's CLIP tokenizer is the real CLIP BPE vocabulary; reuse it (building one takes seconds)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", tokenizer=tokenizer)


def _records(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, (nick, prompt) in enumerate(
        [("a", "a red circle"), ("a", "a red circle"), ("b", "a blue square on a white background")]
    ):
        image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
        out.append(ValidationRecord(nick, prompt, 64, 48, image, tmp_path / f"{i}.png"))
    return out


def _by_hand(folder, records) -> list[float]:
    """100 * cos(image, text) from CLIPModel.forward's logits, clamped at 0 (the CLIP-score definition)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    out = []
    for r in records:
        inputs = processor(text=[r.prompt], images=[r.image], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits_per_image[0, 0]
        out.append(max(100 * (logits / model.logit_scale.exp()).item(), 0.0))
    return out


def test_scores_equal_clip_cosines_from_the_model(clip_folder, tiny_model_cfg, tmp_path):
    cb = CLIPScoreCallback(model_name_or_path=str(clip_folder))
    cb.load(tiny_model_cfg)
    records = _records(tmp_path)
    ours, expected = cb.scores(records), _by_hand(clip_folder, records)
    assert np.allclose(ours, expected, atol=1e-3), (ours, expected)
    assert all(0 < v < 100 for v in ours), "the tiny CLIP should give scores above the clamp"
    assert len(set(np.round(ours, 4))) > 1


def test_round_metrics_are_logged(clip_folder, tiny_model_cfg, tmp_path):
    logged = []
    logger = SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m)), save=lambda: None)
    cb = CLIPScoreCallback(model_name_or_path=str(clip_folder))
    cb.load(tiny_model_cfg)
    records = _records(tmp_path)
    state = torch.get_rng_state()
    cb.on_validation_images(SimpleNamespace(loggers=[logger]), SimpleNamespace(device=torch.device("cpu")), 7, records)
    assert torch.equal(state, torch.get_rng_state())
    ((step, metrics),) = logged
    values = cb.scores(records)
    assert step == 7 and metrics == summarize(values, ["a", "a", "b"])
    assert metrics["clip/prompt/a"] == pytest.approx((values[0] + values[1]) / 2)
    assert metrics["clip/prompt/b"] == pytest.approx(values[2])


def test_summary_statistics():
    m = summarize([10.0, 20.0, 30.0, 40.0], ["x", "x", "y", "y"])
    assert m["clip/mean"] == 25.0 and m["clip/min"] == 10.0 and m["clip/max"] == 40.0
    assert m["clip/std"] == pytest.approx(np.std([10, 20, 30, 40]))
    assert m["clip/prompt/x"] == 15.0 and m["clip/prompt/y"] == 35.0


def test_tiny_flavour_defaults_to_a_locally_built_clip(tiny_model_cfg):
    cb = CLIPScoreCallback()
    cb.load(tiny_model_cfg)  # tiny://clip, built under the model cache dir; nothing downloaded
    assert any(Path(tiny_model_cfg.cache_dir).glob("tiny-clip-*/model.safetensors"))


def test_open_clip_models_work_too(tmp_path, monkeypatch):
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "TinyCLIP-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model("TinyCLIP-test")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    cb = CLIPScoreCallback(
        model_name_or_path="open_clip:TinyCLIP-test", open_clip_pretrained=str(tmp_path / "weights.pt")
    )
    cb.load(SimpleNamespace(spec=None, cache_dir=str(tmp_path)))
    records = _records(tmp_path)
    ours = cb.scores(records)
    _, _, preprocess = open_clip.create_model_and_transforms("TinyCLIP-test", pretrained=str(tmp_path / "weights.pt"))
    tokenizer = open_clip.get_tokenizer("TinyCLIP-test")
    with torch.no_grad():
        img = model.eval().encode_image(torch.stack([preprocess(r.image) for r in records]))
        txt = model.encode_text(tokenizer([r.prompt for r in records]))
    expected = (100 * torch.nn.functional.cosine_similarity(img, txt)).clamp(min=0)
    assert np.allclose(ours, expected.numpy(), atol=1e-3)


def test_a_bad_model_path_is_a_config_error(tiny_model_cfg, tmp_path):
    cb = CLIPScoreCallback(model_name_or_path=str(tmp_path / "no-clip-here"))
    with pytest.raises(ConfigError, match="callbacks.clip_score.model_name_or_path: cannot load CLIP model"):
        cb.load(tiny_model_cfg)


def test_the_flavours_default_clip_is_optional_offline(caplog):
    """A real flavour's default CLIP cannot be fetched offline: warn once and train on, quickly."""
    import time

    from huggingface_hub import constants

    from flux_lightning import ModelConfig

    assert constants.HF_HUB_OFFLINE  # conftest: tests never reach the hub
    cb = CLIPScoreCallback()
    start = time.monotonic()
    with caplog.at_level("WARNING"):
        cb.load(ModelConfig(flavour="krea"))
    assert time.monotonic() - start < 10
    assert cb.metric is None
    assert [r.message for r in caplog.records if "CLIP score is off" in r.message]
    cb.on_validation_images(None, None, 0, ["a record"])  # no metric: nothing happens, nothing raises


def test_torchmetrics_pin_admits_only_versions_with_the_clip_api_used():
    """``CLIPScore(model_name_or_path=<callable returning (model, processor)>)`` (how ``load`` passes
    a local or open_clip model) and the ``hasattr(model.config, "text_config")`` guard that lets a
    model without a transformers config (open_clip) through both arrived in torchmetrics 1.7.0;
    1.6.0 calls ``CLIPModel.from_pretrained`` on whatever it is given."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.specifiers import SpecifierSet

    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = SpecifierSet(next(d for d in deps if d.startswith("torchmetrics")).removeprefix("torchmetrics"))
    assert "1.6.0" not in spec and "1.7.0" in spec
