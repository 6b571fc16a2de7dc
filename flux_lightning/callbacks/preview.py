"""Validation previews: decode intermediate sampler latents with a tiny autoencoder, POST them to a webhook.

Every ``every_n_sampler_steps`` sampler steps (steps k, 2k, ... counted from 1), the packed latents
``(1, S, 64)`` are unpacked to ``(1, 16, H/8, W/8)``, brought back to the VAE's raw space with the
main VAE's factors (``z / scaling_factor + shift_factor``), decoded by a diffusers ``AutoencoderTiny``
(TAEF1 for real flavours) to ``[-1, 1]`` pixels, and sent as JSON
``{step, nickname, sampler_step, num_inference_steps, resolution, image: <base64 PNG>}``.

Webhook failures are logged and retried a bounded number of times with exponential backoff; they
never raise. After one preview exhausts its attempts, the rest of that validation round is skipped
(one warning), so an unreachable webhook costs at most one retry cycle per round.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..training.flow import unpack_latents
from .redaction import redact_url

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

_RETRYABLE_CLIENT_CODES = {408, 425, 429}


class PreviewWebhook:
    """Decode-and-POST helper used by :class:`~flux_lightning.callbacks.ValidationImages`.

    Args:
        url: the webhook (``http://`` or ``https://``).
        every_n_sampler_steps: send a preview after sampler steps k, 2k, ... (quickstart:
            ``validation_preview_steps``).
        autoencoder: diffusers ``AutoencoderTiny`` folder or hub id (``tiny://taef1`` = built locally).
        max_attempts: tries per preview (>= 1).
        timeout: seconds per HTTP request.
        backoff: seconds before the 2nd try; doubled for each further try.
    """

    def __init__(
        self,
        url: str,
        every_n_sampler_steps: int = 1,
        autoencoder: str = "madebyollin/taef1",
        max_attempts: int = 3,
        timeout: float = 5.0,
        backoff: float = 0.5,
    ):
        self.url, self.every = url, every_n_sampler_steps
        self.autoencoder_source = autoencoder
        self.max_attempts, self.timeout, self.backoff = max_attempts, timeout, backoff
        self.sent = self.failed = 0
        self._autoencoder = None
        self._round_failed = False

    # -- decoding -----------------------------------------------------------------------------
    def load(self, device: torch.device) -> None:
        if self._autoencoder is None:
            from diffusers import AutoencoderTiny

            ae = AutoencoderTiny.from_pretrained(self.autoencoder_source, torch_dtype=torch.float32)
            self._autoencoder = ae.requires_grad_(False).eval()
        self._autoencoder.to(device)

    @torch.no_grad()
    def decode(self, packed: torch.Tensor, height: int, width: int, vae_config) -> Image:
        """Packed latents ``(1, S, 64)`` of a ``height x width`` image -> a PIL preview image."""
        from PIL import Image

        scale = vae_config.scaling_factor
        shift = vae_config.shift_factor or 0.0
        factor = 2 ** (len(vae_config.block_out_channels) - 1)
        h, w = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
        z = unpack_latents(packed[:1].float(), h, w) / scale + shift
        ae = self._autoencoder
        pixels = ae.decode(z.to(ae.device, ae.dtype)).sample[0]
        array = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)

    # -- sending ------------------------------------------------------------------------------
    def begin_round(self) -> None:
        """Start a validation round: previews are attempted again after an earlier failure."""
        self._round_failed = False

    def post(self, payload: dict) -> bool:
        """POST ``payload`` as JSON; True on a 2xx answer. Never raises."""
        data = json.dumps(payload).encode()
        for attempt in range(1, self.max_attempts + 1):
            request = urllib.request.Request(
                self.url, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
                self.sent += 1
                return True
            except urllib.error.HTTPError as err:
                reason, retry = f"HTTP {err.code}", err.code >= 500 or err.code in _RETRYABLE_CLIENT_CODES
            except Exception as err:  # refused, timeout, DNS, ...
                reason, retry = f"{type(err).__name__}: {err}", True
            log.warning(
                "validation preview webhook %s: attempt %d/%d failed (%s)",
                redact_url(self.url),
                attempt,
                self.max_attempts,
                redact_url(reason),
            )
            if not retry or attempt == self.max_attempts:
                break
            time.sleep(self.backoff * 2 ** (attempt - 1))
        self.failed += 1
        return False

    def step_callback(
        self, *, step: int, nickname: str, width: int, height: int, num_inference_steps: int, vae_config
    ) -> Callable:
        """A ``callback_on_step_end`` for diffusers pipelines that previews every n-th sampler step."""

        def callback(pipe, i: int, t, kwargs: dict) -> dict:
            sampler_step = i + 1
            if self._round_failed or sampler_step % self.every:
                return {}
            try:
                image = self.decode(kwargs["latents"], height, width, vae_config)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
            except Exception as err:  # a preview must never stop validation or training
                log.warning("validation preview: cannot decode sampler step %d (%s)", sampler_step, err)
                return {}
            ok = self.post(
                {
                    "step": step,
                    "nickname": nickname,
                    "sampler_step": sampler_step,
                    "num_inference_steps": num_inference_steps,
                    "resolution": f"{width}x{height}",
                    "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
                }
            )
            if not ok:
                self._round_failed = True
                log.warning("validation preview: webhook unreachable; skipping the rest of this round's previews")
            return {}

        return callback
