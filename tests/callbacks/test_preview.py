"""Validation previews: tiny-autoencoder decodes POSTed to a real local HTTP server; failures never stop."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.callbacks import ValidationImages
from flux_lightning.config.validation import ConfigError
from flux_lightning.model.tiny import build_tiny_autoencoder_tiny
from flux_lightning.training.flow import unpack_latents


class Webhook:
    """A local HTTP server that records JSON POSTs; the first ``fail_first`` requests get a 500."""

    def __init__(self, fail_first: int = 0):
        self.payloads: list[dict] = []
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests += 1
                if outer.requests <= fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.payloads.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def taef(tmp_path_factory):
    """A tiny random AutoencoderTiny (16 latent channels) saved locally."""
    return build_tiny_autoencoder_tiny(tmp_path_factory.mktemp("taef") / "taef")


@pytest.fixture(scope="module")
def module(tiny_model_cfg):
    m = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=4, init="gaussian"))
    m.configure_model()
    return m


def _trainer(texts, step=0):
    g = torch.Generator().manual_seed(1)
    embeddings = {
        t: {"prompt_embeds": torch.randn(16, 32, generator=g), "pooled_prompt_embeds": torch.randn(32, generator=g)}
        for t in texts
    }
    return SimpleNamespace(
        global_step=step,
        is_global_zero=True,
        loggers=[],
        callbacks=[],
        datamodule=SimpleNamespace(prompt_embedding=lambda t: embeddings[t]),
    )


def _callback(tmp_path, url, taef, **kw):
    settings = dict(
        validation_prompt="a red circle",
        validation_resolution="32x32,48x32",
        validation_num_inference_steps=6,
        validation_preview=True,
        validation_preview_steps=3,
        webhook_url=url,
        preview_autoencoder=str(taef),
        webhook_backoff=0.01,
        webhook_timeout=2.0,
    )
    settings.update(kw)
    return ValidationImages(str(tmp_path), **settings)


def test_previews_arrive_at_a_real_server(module, taef, tmp_path):
    with Webhook() as hook:
        cb = _callback(tmp_path, hook.url, taef)
        records = cb.generate(_trainer(cb.prompt_texts(), step=5), module)
    # 6 sampler steps, a preview every 3 -> steps 3 and 6, for each of 2 resolutions
    assert [(p["nickname"], p["resolution"], p["sampler_step"]) for p in hook.payloads] == [
        ("validation", "32x32", 3),
        ("validation", "32x32", 6),
        ("validation", "48x32", 3),
        ("validation", "48x32", 6),
    ]
    assert all(p["step"] == 5 and p["num_inference_steps"] == 6 for p in hook.payloads)
    images = [Image.open(io.BytesIO(base64.b64decode(p["image"]))) for p in hook.payloads]
    assert [im.format for im in images] == ["PNG"] * 4
    assert [im.size for im in images] == [(32, 32), (32, 32), (48, 32), (48, 32)]
    assert cb.preview.sent == 4 and cb.preview.failed == 0 and len(records) == 2


def test_the_last_preview_is_the_final_latent_through_the_tiny_autoencoder(module, taef, tmp_path):
    with Webhook() as hook:
        cb = _callback(tmp_path, hook.url, taef, validation_resolution="32x32")
        trainer = _trainer(cb.prompt_texts())
        cb.generate(trainer, module)
    # the same render by hand, up to the final latents, decoded with diffusers' AutoencoderTiny
    pipe = cb._pipeline(module)
    e = trainer.datamodule.prompt_embedding("a red circle")
    module.transformer.eval()
    packed = pipe(
        prompt_embeds=e["prompt_embeds"][None],
        pooled_prompt_embeds=e["pooled_prompt_embeds"][None],
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    vae = pipe.vae.config
    z = unpack_latents(packed, 4, 4) / vae.scaling_factor + vae.shift_factor
    with torch.no_grad():
        pixels = AutoencoderTiny.from_pretrained(str(taef)).decode(z).sample[0]
    expected = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    last = np.asarray(Image.open(io.BytesIO(base64.b64decode(hook.payloads[-1]["image"]))))
    assert hook.payloads[-1]["sampler_step"] == 6
    assert np.abs(last.astype(int) - expected.astype(int)).max() <= 1


def test_server_errors_are_retried_with_a_bound(module, taef, tmp_path):
    with Webhook(fail_first=2) as hook:
        cb = _callback(tmp_path, hook.url, taef, validation_resolution="32x32", webhook_max_attempts=3)
        cb.generate(_trainer(cb.prompt_texts()), module)
    assert hook.requests == 4  # 2 failures + success for step 3, then step 6
    assert [p["sampler_step"] for p in hook.payloads] == [3, 6]
    assert cb.preview.sent == 2 and cb.preview.failed == 0


def test_a_dead_webhook_never_stops_validation(module, taef, tmp_path, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cb = _callback(tmp_path, f"http://127.0.0.1:{port}/hook", taef, webhook_max_attempts=2)
    records = cb.generate(_trainer(cb.prompt_texts()), module)
    assert len(records) == 2 and all(r.path.is_file() for r in records)
    # one preview exhausted its 2 attempts; the rest of the round was skipped
    assert cb.preview.failed == 1 and cb.preview.sent == 0
    assert sum("attempt" in r.getMessage() for r in caplog.records) == 2
    with Webhook() as hook:  # the next round tries again
        cb.preview.url = hook.url
        cb.generate(_trainer(cb.prompt_texts(), step=1), module)
    assert len(hook.payloads) == 4


def test_preview_settings_are_checked_early(tmp_path):
    with pytest.raises(ConfigError, match="validation_preview=true needs callbacks.validation.webhook_url"):
        ValidationImages(str(tmp_path), validation_preview=True)
    with pytest.raises(ConfigError, match="validation_preview_steps=0 must be >= 1"):
        ValidationImages(str(tmp_path), validation_preview=True, webhook_url="http://x", validation_preview_steps=0)
