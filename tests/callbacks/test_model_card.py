"""The model card and Hub upload: facts of the run, the images, the config; never a secret or a local path."""

import inspect
import logging
import os

import huggingface_hub
import pytest
from hydra import compose, initialize_config_dir

from flux_lightning.callbacks import ModelCard
from flux_lightning.run import train as train_module
from flux_lightning.run.train import config_dir, train

SECRET = "hf_THISISASECRETTOKEN1234567890"
WEBHOOK = "https://discord.com/api/webhooks/1234567890/WEBHOOKSECRETabcdef"
PROMPT = 'it\'s my "sks" dog: 1'


def test_card_config_images_and_upload_without_leaking_the_token(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )

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
        # a webhook URL carrying a token, here the HF token itself through an env interpolation
        "callbacks.validation.webhook_url=https://discord.com/api/webhooks/123/${oc.env:HF_TOKEN}",
        f"model.cache_dir={tmp_path}/models",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    serialised_in = []  # the resolved config is serialised when the card is written, not before training
    resolved_yaml = train_module._resolved_yaml

    def recording(cfg):
        serialised_in.append([f.function for f in inspect.stack()])
        return resolved_yaml(cfg)

    monkeypatch.setattr(train_module, "_resolved_yaml", recording)
    with caplog.at_level(logging.DEBUG):
        train(cfg)
    assert len(serialised_in) == 1 and "on_train_end" in serialised_in[0]
    lora = tmp_path / "run" / "lora"
    card = (lora / "README.md").read_text()
    for fact in (
        "| base model | tiny:// |",
        "| rank | 4 |",
        "| alpha | 2.0 |",
        "| target | all |",
        "| steps | 2 |",
        "| training guidance | 1.0 |",
        "| shift | none |",
        "images/validation_64x64.png",
    ):
        assert fact in card, fact
    data = huggingface_hub.ModelCard.load(lora / "README.md").data
    assert data.instance_prompt == "sks shape" and data.license == "apache-2.0" and data.base_model is None
    assert data.widget == [{"text": "a photo of sks shape", "output": {"url": "images/validation_64x64.png"}}]
    assert (lora / "images" / "validation_64x64.png").is_file()
    config = (lora / "config.yaml").read_text()
    assert "rank: 4" in config and "webhook_url: <redacted>" in config and "cache_dir: <redacted>/cache" in config
    assert calls[0] == ("create", "someone/flux-shapes", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][0] == "upload" and {
        "README.md",
        "config.yaml",
        "pytorch_lora_weights.safetensors",
        "validation_64x64.png",
    } <= set(calls[1][2])
    out = capsys.readouterr()
    seen = caplog.text + out.out + out.err
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            seen += f.read_bytes().decode("latin-1")
    assert SECRET not in seen
    uploaded = ""
    for f in lora.rglob("*"):
        if f.is_file():
            uploaded += f.read_bytes().decode("latin-1")
    for private in (SECRET, "discord.com", str(tmp_path), os.path.expanduser("~") + "/"):
        assert private not in uploaded, private


@pytest.mark.parametrize(
    "flavour,base,license_,license_name",
    [
        ("dev", "black-forest-labs/FLUX.1-dev", "other", "flux-1-dev-non-commercial-license"),
        ("krea", "black-forest-labs/FLUX.1-Krea-dev", "other", "flux-1-dev-non-commercial-license"),
        ("kontext", "black-forest-labs/FLUX.1-Kontext-dev", "other", "flux-1-dev-non-commercial-license"),
        ("schnell", "black-forest-labs/FLUX.1-schnell", "apache-2.0", None),
        ("tiny", None, "apache-2.0", None),
    ],
)
def test_card_header_round_trips_through_huggingface_hub(tmp_path, flavour, base, license_, license_name):
    from flux_lightning.callbacks.model_card import render_card
    from flux_lightning.model.flavours import FLAVOURS

    facts = {
        "model_source": None,
        "flavour_source": FLAVOURS[flavour].source,
        "base_model": FLAVOURS[flavour].source,
        "flavour": flavour,
        "transformer": "/home/me/models/dev2pro/transformer",
        "instance_prompt": PROMPT,
        "rank": 4,
        "validation_guidance": 3.5,
    }
    render_card(facts, [(PROMPT, "images/validation_64x64.png")]).save(tmp_path / "README.md")
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.instance_prompt == PROMPT
    assert data.widget == [{"text": PROMPT, "output": {"url": "images/validation_64x64.png"}}]
    assert (data.base_model, data.license, data.license_name) == (base, license_, license_name)
    if license_name:
        assert data.license_link == f"https://huggingface.co/{base}/blob/main/LICENSE.md"
    assert {"flux", "lora", "diffusers", "text-to-image"} <= set(data.tags) and data.library_name == "diffusers"
    assert "/home/me" not in card.content and "| transformer | <redacted>/transformer |" in card.content


def test_local_model_folder_is_never_named_as_base_model(tmp_path):
    from flux_lightning.callbacks.model_card import base_model_id

    local = tmp_path / "FLUX.1-dev"
    local.mkdir()
    facts = {"model_source": str(local), "flavour_source": "black-forest-labs/FLUX.1-dev"}
    assert base_model_id(facts) == "black-forest-labs/FLUX.1-dev"
    assert base_model_id({**facts, "model_source": "someone/dev-finetune"}) == "someone/dev-finetune"


def test_redaction_of_secrets_urls_and_local_paths(monkeypatch):
    from flux_lightning.callbacks.model_card import redact_yaml

    monkeypatch.setenv("WANDB_API_KEY", "wandbsecretvalue123")
    text = (
        "paths:\n  output_dir: /data/runs/2024-01-01/run\n  cache_dir: ~/.cache/flux\n"
        f"callbacks:\n  validation:\n    webhook_url: {WEBHOOK}\n    validation_prompt: '{PROMPT.replace(chr(39), chr(39) * 2)}'\n"
        "logger:\n  note: key wandbsecretvalue123 here\n  hf_token: anything\n"
        f"model:\n  pretrained_model_name_or_path: C:\\models\\flux-dev\n  revision: main\n  mirror: {SECRET}\n"
        "dataset:\n  backends:\n  - instance_data_dir: /mnt/photos/dog\n  - instance_data_dir: data/relative\n"
    )
    out = redact_yaml(text)
    for private in ("/data/runs", "~/.cache", "discord", "wandbsecret", "anything", "C:", SECRET, "/mnt/photos"):
        assert private not in out, private
    for kept in (
        "output_dir: <redacted>/run",
        "cache_dir: <redacted>/flux",
        "<redacted>/flux-dev",
        "revision: main",
        "instance_data_dir: data/relative",
        "<redacted>/dog",
    ):
        assert kept in out, kept
    import yaml

    assert yaml.safe_load(out)["callbacks"]["validation"]["validation_prompt"] == PROMPT


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


def test_the_run_config_is_computed_once_when_first_needed(tmp_path):
    card = ModelCard(dirpath=str(tmp_path))
    calls = []
    card.set_run_config(lambda: calls.append(1) or "rank: 4\n")
    assert calls == []  # nothing serialised when the run starts
    assert card.config_yaml == "rank: 4\n" and card.config_yaml == "rank: 4\n"
    assert calls == [1]
    card.set_run_config("seed: 1\n")  # a string is taken as it is
    assert card.config_yaml == "seed: 1\n"
