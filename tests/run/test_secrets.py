"""A webhook URL's token (and other secrets) never reaches train.log, ``.hydra/*.yaml``, result.json,
stdout or stderr: the records keep local paths and drop secrets (flux_lightning.callbacks.redaction)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

import yaml

from flux_lightning.callbacks.preview import PreviewWebhook
from flux_lightning.callbacks.redaction import redact_secrets, redact_url
from flux_lightning.run.hydra_redact import redact_hydra_files

from ..support.cli import flux_lightning

REPO = Path(__file__).resolve().parents[2]
TOKEN = "SECRETTOKENabc123"
HOOK = f"https://discord.com/api/webhooks/123/{TOKEN}"


def test_secrets_are_redacted_and_local_paths_kept(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandbsecretvalue123")
    tree = {
        "overrides": [
            f"callbacks.validation.webhook_url={HOOK}",
            "dataset.instance_data_dir=/data/dogs",
            "+logger.note=key wandbsecretvalue123",
            f"+x.url=http://user:pw@host:8/p?t={TOKEN}",
        ],
        "callbacks": {"validation": {"webhook_url": HOOK}},
        "hub_token": "hf_" + "a" * 30,
        "job": {"override_dirname": f"a=1,callbacks.validation.webhook_url={HOOK},b=2"},
    }
    out = redact_secrets(tree)
    text = repr(out)
    for private in (TOKEN, "wandbsecret", "user:pw", "hf_aaa", "/api/webhooks"):
        assert private not in text, private
    assert out["overrides"][0] == "callbacks.validation.webhook_url=<redacted>"
    assert out["overrides"][1] == "dataset.instance_data_dir=/data/dogs"  # the user's own paths stay
    assert out["overrides"][3] == "+x.url=http://host:8/<redacted>"
    assert redact_url("http://127.0.0.1:9") == "http://127.0.0.1:9"


def test_hydra_files_are_rewritten_without_the_token(tmp_path):
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump([f"callbacks.validation.webhook_url={HOOK}", "seed=1"]))
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"callbacks": {"validation": {"webhook_url": HOOK}}, "seed": 1})
    )
    untouched = "seed: 1\n# a comment Hydra wrote\n"
    (tmp_path / "hydra.yaml").write_text(untouched)
    redact_hydra_files(tmp_path)
    assert not any(TOKEN in p.read_text() for p in tmp_path.iterdir())
    assert yaml.safe_load((tmp_path / "overrides.yaml").read_text())[1] == "seed=1"
    assert (tmp_path / "hydra.yaml").read_text() == untouched  # nothing to redact: Hydra's file as it was


def test_a_failing_webhook_is_logged_without_its_token(caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = PreviewWebhook(f"http://127.0.0.1:{port}/api/webhooks/1/{TOKEN}", max_attempts=1, timeout=1.0, backoff=0.0)
    with caplog.at_level(logging.WARNING):
        assert not sender.post({"x": 1})
    assert caplog.records and not any(TOKEN in r.getMessage() for r in caplog.records)
    assert any(f"127.0.0.1:{port}/<redacted>" in r.getMessage() for r in caplog.records)


def test_the_cli_writes_no_token_in_hydra_files_or_output(tmp_path):
    """Hydra writes .hydra/ before the job; a config error then stops the run early (exit 2)."""
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        flux_lightning(
            f"hydra.run.dir={run}",
            f"paths.cache_dir={tmp_path}/cache",
            f"callbacks.validation.webhook_url={HOOK}",
            "adapter.rank=0",
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert TOKEN not in out.stdout + out.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert not [p for p in files if TOKEN in p.read_text(errors="replace")]


def test_hydra_files_are_read_as_yaml_safe_load_reads_them(tmp_path):
    """The redaction reads Hydra's files with libyaml's parser where PyYAML has it: the same values as
    ``yaml.safe_load`` (same constructor and resolver), so a file is rewritten exactly when it was before."""
    text = (
        "a: yes\nb: off\nc: ~\nd: 1e-4\ne: 1.0e-4\nf: .inf\ng: 2026-12-06\nh: '012'\ni: 0x1F\nj: [1, 'x', null]\n"
        "k: {l: -.5, m: 'http://host/api/webhooks/1/tok'}\nn: |-\n  multi\n  line\n"
    )
    (tmp_path / "hydra.yaml").write_text(text)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    assert yaml.load(text, Loader=loader) == yaml.safe_load(text)
    redact_hydra_files(tmp_path)
    assert yaml.safe_load((tmp_path / "hydra.yaml").read_text())["k"]["m"] == "http://host/<redacted>"
