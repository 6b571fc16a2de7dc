"""The model card and Hub upload: facts of the run, the images, the config; never the token."""

import logging

from hydra import compose, initialize_config_dir

import huggingface_hub
from flux_lightning.train import config_dir, train

SECRET = "hf_THISISASECRETTOKEN1234567890"


def test_card_config_images_and_upload_without_leaking_the_token(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(self, repo_id, folder_path, **kw):
        from pathlib import Path

        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).rglob("*") if p.is_file())))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    overrides = [
        f"paths.output_dir={tmp_path}/run",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_steps=2",
        "adapter.rank=4",
        "adapter.alpha=2",
        "logger=csv",
        "dataset.instance_prompt=sks shape",
        "callbacks.validation.validation_prompt='a photo of <token>'",
        "callbacks.validation.before_training=false",
        "callbacks.model_card.push_to_hub=true",
        "callbacks.model_card.hub_model_id=someone/flux-shapes",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with caplog.at_level(logging.DEBUG):
        train(cfg)
    lora = tmp_path / "run" / "lora"
    card = (lora / "README.md").read_text()
    for fact in ("base_model: tiny://", "| rank | 4 |", "| alpha | 2.0 |", "| target | all |", "| steps | 2 |",
                 "instance_prompt: 'sks shape'", "| training guidance | 1.0 |", "| shift | none |", "images/validation_64x64.png"):
        assert fact in card, fact
    assert (lora / "images" / "validation_64x64.png").is_file()
    assert "rank: 4" in (lora / "config.yaml").read_text()
    assert calls[0] == ("create", "someone/flux-shapes", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][0] == "upload" and {"README.md", "config.yaml", "pytorch_lora_weights.safetensors", "validation_64x64.png"} <= set(calls[1][2])
    out = capsys.readouterr()
    seen = caplog.text + out.out + out.err
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            seen += f.read_bytes().decode("latin-1")
    assert SECRET not in seen


def test_failed_upload_is_logged_and_files_stay(tmp_path, caplog):
    from flux_lightning.callbacks import ModelCard

    def refuse(self, *a, **k):
        raise ConnectionError("no network")

    card = ModelCard(str(tmp_path), push_to_hub=True, hub_model_id="me/x")
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.HfApi, "create_repo", refuse)
        with caplog.at_level(logging.ERROR):
            assert card.upload() is None
    assert "push_to_hub to me/x failed (ConnectionError)" in caplog.text and "hf upload" in caplog.text
