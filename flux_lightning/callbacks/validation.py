"""Validation images from the training transformer, with prompt embeddings from the text cache."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..errors import ConfigError, Problem
from ..model.memory import park
from ..model.tiny import resolve_tiny_source
from ..training import stopping
from ..training.hooks import (
    ConfigChecked,
    PromptTexts,
    RendersImages,
    SummaryRows,
    ValidationImagesListener,
    ValidationWeights,
    raise_problems,
)
from ..training.strategies import is_sharded
from ..values import is_int
from .isolation import isolated
from .preview import PreviewWebhook

log = logging.getLogger(__name__)

_FIELD = "callbacks.validation"


def parse_resolutions(value: str | int) -> list[tuple[int, int]]:
    """``"1024x1024,1280x768"`` (or ``512``) -> ``[(1024, 1024), (1280, 768)]`` as (width, height)."""
    out = []
    for part in str(value).split(","):
        w, _, h = part.strip().lower().partition("x")
        try:
            width, height = int(w), int(h or w)
        except ValueError:
            raise ConfigError(
                Problem(
                    f"{_FIELD}.validation_resolution",
                    f"{_FIELD}.validation_resolution: {part.strip()!r} is not WIDTHxHEIGHT; write e.g. 1024x1024,1280x768",
                )
            ) from None
        if width <= 0 or height <= 0 or width % 16 or height % 16:
            raise ConfigError(
                Problem(
                    f"{_FIELD}.validation_resolution",
                    f"{_FIELD}.validation_resolution: {part.strip()!r} must have positive sides that are multiples of 16",
                )
            )
        out.append((width, height))
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict, refusing repeated keys (``json`` would keep only the last)."""
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"nickname(s) {repeated} appear twice; rename one")
    return dict(pairs)


def prompt_library(
    validation_prompt: str | None, user_prompt_library: str | None, instance_prompt: str | None
) -> dict[str, str]:
    """Nickname -> prompt, from ``validation_prompt`` (nickname ``validation``) and a JSON library file
    (``{"nickname": "prompt", ...}``); ``<token>`` is replaced by the instance prompt in both."""
    prompts: list[tuple[str, str]] = []
    if validation_prompt:
        prompts.append(("validation", validation_prompt))
    if user_prompt_library:
        path = Path(user_prompt_library).expanduser()
        try:
            library = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
        except (OSError, ValueError) as err:
            raise ConfigError(
                Problem(f"{_FIELD}.user_prompt_library", f"{_FIELD}.user_prompt_library: cannot read {path} ({err})")
            ) from None
        if not isinstance(library, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in library.items()
        ):
            raise ConfigError(
                Problem(
                    f"{_FIELD}.user_prompt_library",
                    f"{_FIELD}.user_prompt_library: {path} must be a JSON object of nickname -> prompt strings",
                )
            )
        prompts += library.items()
    token = instance_prompt or ""
    out: dict[str, str] = {}
    for nick, p in prompts:
        name = nick.replace("<token>", token)
        if name in out:
            raise ConfigError(
                Problem(
                    f"{_FIELD}.user_prompt_library",
                    f"{_FIELD}.user_prompt_library: two prompts have the nickname {name!r} (after <token> = "
                    f"{token!r}; 'validation' is validation_prompt's); rename one",
                )
            )
        out[name] = p.replace("<token>", token)
    return out


def _stop_between_sampler_steps(preview=None):
    """A ``callback_on_step_end`` that raises :class:`~flux_lightning.training.stopping.StopRequested` after
    any sampler step once SIGTERM/SIGINT arrived (then runs the preview callback, if any)."""

    def callback(pipe, i: int, t, kwargs: dict) -> dict:
        stopping.check()
        return preview(pipe, i, t, kwargs) if preview is not None else {}

    return callback


def safe_name(nickname: str) -> str:
    """A nickname usable as a file name: anything but letters, digits, ``.``, ``_`` and ``-`` -> ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", nickname).strip("._") or "prompt"


_MAX_NAME = 80  # characters of a nickname kept in file names (file systems allow 255 bytes)


def unique_names(nicknames) -> dict[str, str]:
    """Nickname -> a file-name-safe name, distinct for distinct nicknames and stable across runs.

    A nickname keeps its :func:`safe_name` when that is the nickname itself and no other nickname
    maps to the same name (compared case-insensitively, as on macOS/Windows disks). Every other
    member of a clash (``"dog 1"`` next to ``"dog_1"``), and any name cut to 80 characters, gets
    ``-`` + the first 8 hex digits of the nickname's SHA-1, which depends on nothing else.
    Also used for TensorBoard tags (``clip/prompt/<name>``), which would clean both to ``dog_1``.
    """
    nicknames = list(dict.fromkeys(nicknames))
    base = {n: safe_name(n)[:_MAX_NAME] for n in nicknames}
    groups: dict[str, list[str]] = {}
    for n in nicknames:
        groups.setdefault(base[n].lower(), []).append(n)
    out = {}
    for members in groups.values():
        clean = [n for n in members if base[n] == n]
        for n in members:
            keep = base[n] == n and len(clean) == 1
            out[n] = base[n] if keep else f"{base[n]}-{hashlib.sha1(n.encode()).hexdigest()[:8]}"
    return out


@dataclass
class ValidationRecord:
    """One rendered validation image."""

    nickname: str
    prompt: str
    width: int
    height: int
    image: Any  # PIL.Image.Image
    path: Path
    name: str = ""  # the nickname as used in file names and metric keys (see unique_names)


class ValidationImages(L.Callback):
    """Generate images with the flavour's diffusers pipeline (``FluxPipeline``, or
    ``FluxKontextPipeline`` for kontext) before training, every n steps and at the end.

    The pipeline gets the training transformer (LoRA active, dropout off; the adapter EMA's weights
    with ``callbacks.ema.use_for_validation``), a VAE decoder and
    prompt embeddings read from the datamodule's text cache; no text encoder is loaded. Each image
    starts from the same seeded noise, so steps are comparable. RNG state and train mode are
    restored afterwards, so validation never changes the training trajectory.

    Files: ``<dirpath>/step_<N>/<name>_<W>x<H>.png``, ``<name>`` the nickname made file-safe and
    unique (see :func:`unique_names`). A grid (a row per prompt, a column per
    resolution) goes to TensorBoard (``validation/images``) and to any logger with ``log_image``
    (W&B). Callbacks that define ``on_validation_images(trainer, pl_module, step, records)`` (the
    CLIP score) receive the images of each round.

    Args:
        dirpath: output folder, usually ``<run dir>/validation``.
        validation_prompt: one prompt (nickname ``validation``).
        user_prompt_library: JSON file of nickname -> prompt; ``<token>`` = ``instance_prompt``.
        instance_prompt: the dataset's instance prompt.
        every_n_steps: render every n optimizer steps (0 = only baseline and final).
        validation_resolution: ``WxH`` list, e.g. ``1024x1024,1280x768`` (or one side).
        validation_num_inference_steps: sampler steps; null = the flavour's (schnell 4, tiny 8, 20).
        validation_guidance: embedded guidance; null = the flavour's.
        validation_guidance_real: > 1 = true CFG against ``validation_negative_prompt``; null = the
            flavour's (fluxbooru/libreflux 4.0).
        validation_negative_prompt: negative prompt of true CFG (default empty).
        validation_seed: seed of the starting noise of every image.
        before_training: render a baseline at step 0.
        validation_reference_image: conditioning image for pipelines that take one (kontext).
        validation_preview: POST intermediate previews to ``webhook_url`` while sampling.
        validation_preview_steps: preview every k sampler steps.
        webhook_url: where previews go.
        preview_autoencoder: ``AutoencoderTiny`` source; null = the flavour's (``madebyollin/taef1``).
        webhook_max_attempts / webhook_timeout / webhook_backoff: retry policy of the webhook.
    """

    implements = (ConfigChecked, PromptTexts, SummaryRows)  # hooks.py; tests/callbacks/test_hooks.py checks them

    def __init__(
        self,
        dirpath: str,
        validation_prompt: str | None = None,
        user_prompt_library: str | None = None,
        instance_prompt: str | None = None,
        every_n_steps: int = 0,
        validation_resolution: str | int = 1024,
        validation_num_inference_steps: int | None = None,
        validation_guidance: float | None = None,
        validation_guidance_real: float | None = None,
        validation_negative_prompt: str = "",
        validation_seed: int = 0,
        before_training: bool = True,
        validation_reference_image: str | None = None,
        validation_preview: bool = False,
        validation_preview_steps: int = 1,
        webhook_url: str | None = None,
        preview_autoencoder: str | None = None,
        webhook_max_attempts: int = 3,
        webhook_timeout: float = 5.0,
        webhook_backoff: float = 0.5,
    ):
        raise_problems(self.config_problems(
            {
                "every_n_steps": every_n_steps, "validation_num_inference_steps": validation_num_inference_steps,
                "validation_preview": validation_preview, "webhook_url": webhook_url,
                "validation_preview_steps": validation_preview_steps, "webhook_max_attempts": webhook_max_attempts,
                "validation_reference_image": validation_reference_image,
            },
            field=_FIELD,
        ))  # fmt: skip
        self.dirpath = Path(dirpath)
        self.prompts = prompt_library(validation_prompt, user_prompt_library, instance_prompt)
        self.names = unique_names(self.prompts)
        self.every_n_steps = every_n_steps
        self.resolutions = parse_resolutions(validation_resolution)
        self.steps, self.guidance = validation_num_inference_steps, validation_guidance
        self.guidance_real = validation_guidance_real
        self.negative_prompt = validation_negative_prompt or ""
        self.seed, self.before_training = validation_seed, before_training
        self.instance_prompt = instance_prompt
        self.reference_image = validation_reference_image
        self.preview = (
            PreviewWebhook(
                webhook_url,
                validation_preview_steps,
                preview_autoencoder or "",  # resolved against the flavour in _pipeline()
                webhook_max_attempts,
                webhook_timeout,
                webhook_backoff,
            )
            if validation_preview
            else None
        )
        self._vae = self._scheduler = None
        self._last_step = -1
        self.last_records: list[ValidationRecord] = []

    @classmethod
    def config_problems(cls, args: Mapping, *, field: str = _FIELD, run=None) -> list[Problem]:
        """Intervals and step counts out of range, a preview without a webhook, a reference image that
        is no file (the prompt library and resolutions are read, and refused, when it is built)."""
        out = []
        every = args.get("every_n_steps", 0)
        if not is_int(every) or every < 0:
            out.append(
                Problem(
                    f"{field}.every_n_steps",
                    f"{field}.every_n_steps={every!r} must be an integer >= 0 (0 = baseline and final only); e.g. 100",
                )
            )
        steps = args.get("validation_num_inference_steps")
        if steps is not None and steps < 1:
            out.append(
                Problem(
                    f"{field}.validation_num_inference_steps",
                    f"{field}.validation_num_inference_steps must be >= 1 or null (the flavour's)",
                )
            )
        if args.get("validation_preview"):
            url = args.get("webhook_url")
            if not url or not str(url).startswith(("http://", "https://")):
                out.append(
                    Problem(
                        f"{field}.webhook_url",
                        f"{field}.validation_preview=true needs {field}.webhook_url=<http(s) URL> (got {url!r})",
                    )
                )
            if args.get("validation_preview_steps", 1) < 1:
                out.append(
                    Problem(
                        f"{field}.validation_preview_steps",
                        f"{field}.validation_preview_steps={args['validation_preview_steps']} must be >= 1",
                    )
                )
            if args.get("webhook_max_attempts", 3) < 1:
                out.append(
                    Problem(
                        f"{field}.webhook_max_attempts",
                        f"{field}.webhook_max_attempts={args['webhook_max_attempts']} must be >= 1",
                    )
                )
        image = args.get("validation_reference_image")
        if image and not Path(image).expanduser().is_file():
            out.append(
                Problem(
                    f"{field}.validation_reference_image", f"{field}.validation_reference_image: {image} is not a file"
                )
            )
        return out

    def prompt_texts(self) -> list[str]:
        """Every text this callback needs embedded (so the datamodule caches them)."""
        return [*self.prompts.values(), self.negative_prompt]

    def summary_rows(self) -> list[tuple[str, object]]:
        return [("validation images", self.dirpath)]

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self.before_training and trainer.global_step == 0:
            self.generate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.generate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.generate(trainer, pl_module)

    # -- settings ------------------------------------------------------------------------------
    def sampling(self, spec) -> dict[str, float | int]:
        """Sampler settings for flavour ``spec``: explicit settings win over the flavour's defaults."""
        return {
            "num_inference_steps": self.steps or spec.validation_steps,
            "guidance_scale": spec.validation_guidance if self.guidance is None else self.guidance,
            "true_cfg_scale": spec.validation_guidance_real if self.guidance_real is None else self.guidance_real,
        }

    # -- generation ----------------------------------------------------------------------------
    def _pipeline(self, pl_module):
        import diffusers

        from ..model.components import load_scheduler, load_vae

        model_cfg = pl_module.model_cfg
        if self._vae is None:
            # in the transformer's dtype, as a diffusers pipeline holds its parts: the latents it
            # decodes come out of the transformer in that dtype (bf16 for a bf16 base)
            vae = load_vae(model_cfg, dtype=pl_module.compute_dtype)
            if not self.reference_image:
                vae.encoder = None  # decoding only (a reference image needs the encoder)
            self._vae, self._scheduler = vae, load_scheduler(model_cfg)
        self._vae.to(pl_module.device)
        if self.preview is not None:
            source = self.preview.autoencoder_source or model_cfg.spec.preview_autoencoder
            self.preview.autoencoder_source = resolve_tiny_source(source, model_cfg.cache_dir)
            self.preview.load(pl_module.device)
        pipeline_class = getattr(diffusers, model_cfg.spec.validation_pipeline)
        pipe = pipeline_class(
            scheduler=self._scheduler,
            vae=self._vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=pl_module.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _extra_kwargs(self, pipe, width: int, height: int) -> dict:
        """Keyword arguments that only some pipelines take (the kontext pipeline's image, area)."""
        params = inspect.signature(pipe.__call__).parameters
        kwargs = {}
        if "max_area" in params:  # keep the requested size instead of the pipeline's 1024^2 area
            kwargs["max_area"] = width * height
        if self.reference_image:
            if "image" in params:
                from PIL import Image

                kwargs["image"] = (
                    Image.open(Path(self.reference_image).expanduser()).convert("RGB").resize((width, height))
                )
                if "_auto_resize" in params:
                    kwargs["_auto_resize"] = False
            else:
                log.warning("%s.validation_reference_image is ignored: %s takes no image", _FIELD, type(pipe).__name__)
        return kwargs

    def generate(self, trainer, pl_module) -> list[ValidationRecord]:
        """Render every prompt at every resolution for the current step; returns the records."""
        step = trainer.global_step
        writer = trainer.is_global_zero
        # sharded parameters (FSDP, ZeRO-3): every rank runs the sampler (each forward gathers a
        # block at a time, a collective); rank 0 writes and logs the images
        if not self.prompts or step == self._last_step or not (writer or is_sharded(trainer)):
            return []
        self._last_step = step
        with isolated(pl_module.transformer), self._weights(trainer, pl_module):
            records = self._render(trainer.datamodule, pl_module, step, write=writer)
        if not writer:
            return []
        self.last_records = records
        self._log_grid(trainer, records, step)
        for callback in trainer.callbacks:
            if isinstance(callback, ValidationImagesListener):
                callback.on_validation_images(trainer, pl_module, step, records)
        return records

    @staticmethod
    def _weights(trainer, pl_module):
        """The adapter weights to render with: a callback's ``validation_weights(pl_module)`` context
        (the adapter EMA with ``callbacks.ema.use_for_validation``; live weights restored bit for bit
        on exit), else the live weights."""
        for callback in trainer.callbacks:
            weights = callback.validation_weights(pl_module) if isinstance(callback, ValidationWeights) else None
            if weights is not None:
                return weights
        return nullcontext()

    def _render(self, datamodule, pl_module, step: int, write: bool = True) -> list[ValidationRecord]:
        settings = self.sampling(pl_module.model_cfg.spec)
        embed = datamodule.prompt_embedding
        pipe = self._pipeline(pl_module)
        device = pl_module.device
        renders = isinstance(pl_module, RendersImages)
        dtype = pl_module.compute_dtype if renders else next(pl_module.transformer.parameters()).dtype
        # adapters as for inference (assistant LoRA off) and, for attention-masked flavours, the T5 mask
        inference = pl_module.inference_adapters if renders else None
        negative_mask = embed(self.negative_prompt).get("attention_mask")

        def tensors(text: str, prefix: str = "") -> dict[str, torch.Tensor]:
            e = embed(text)
            return {
                f"{prefix}prompt_embeds": e["prompt_embeds"][None].to(device, dtype),
                f"{prefix}pooled_prompt_embeds": e["pooled_prompt_embeds"][None].to(device, dtype),
            }

        cfg_kwargs = {}
        if settings["true_cfg_scale"] > 1:
            cfg_kwargs = {"true_cfg_scale": settings["true_cfg_scale"], **tensors(self.negative_prompt, "negative_")}
        out_dir = self.dirpath / f"step_{step}"
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
        if self.preview is not None and write:
            self.preview.begin_round()
        records = []
        for nick, prompt in self.prompts.items():
            text = tensors(prompt)
            for width, height in self.resolutions:
                stopping.check()
                kwargs = {**text, **cfg_kwargs, **self._extra_kwargs(pipe, width, height)}
                preview = None
                if self.preview is not None and write:
                    preview = self.preview.step_callback(
                        step=step,
                        nickname=nick,
                        width=width,
                        height=height,
                        num_inference_steps=settings["num_inference_steps"],
                        vae_config=self._vae.config,
                    )
                kwargs["callback_on_step_end"] = _stop_between_sampler_steps(preview)
                mask = embed(prompt).get("attention_mask")
                if mask is not None and "true_cfg_scale" in cfg_kwargs and negative_mask is not None:
                    mask = mask.bool() | negative_mask.bool()  # one mask serves both CFG branches
                with inference(text_attention_mask=mask) if inference else nullcontext():
                    image = pipe(
                        height=height,
                        width=width,
                        num_inference_steps=settings["num_inference_steps"],
                        guidance_scale=settings["guidance_scale"],
                        generator=torch.Generator(device="cpu").manual_seed(self.seed),
                        **kwargs,
                    ).images[0]
                path = out_dir / f"{self.names[nick]}_{width}x{height}.png"
                if write:
                    image.save(path)
                records.append(ValidationRecord(nick, prompt, width, height, image, path, self.names[nick]))
        for helper in (self._vae, self.preview and self.preview._autoencoder):
            park(helper, pl_module.model_cfg)  # model.enable_model_cpu_offload: back to the CPU
        return records

    def _log_grid(self, trainer, records: list[ValidationRecord], step: int) -> None:
        if not records:
            return
        import numpy as np
        from lightning.pytorch.loggers import TensorBoardLogger
        from torchvision.utils import make_grid

        size = records[0].image.size
        tensors = [torch.from_numpy(np.array(r.image.convert("RGB").resize(size))).permute(2, 0, 1) for r in records]
        grid = make_grid(torch.stack(tensors), nrow=len(self.resolutions), padding=2)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("validation/images", grid, step)
                logger.experiment.flush()
            elif callable(getattr(logger, "log_image", None)):  # W&B and friends
                captions = [f"{r.nickname} {r.width}x{r.height}" for r in records]
                logger.log_image(
                    key="validation/images", images=[r.image for r in records], step=step, caption=captions
                )
