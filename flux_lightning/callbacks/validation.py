"""Validation images from the training transformer, with prompt embeddings from the text cache."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


def parse_resolutions(value: str | int) -> list[tuple[int, int]]:
    """``"1024x1024,1280x768"`` (or ``512``) -> ``[(1024, 1024), (1280, 768)]`` as (width, height)."""
    out = []
    for part in str(value).split(","):
        w, _, h = part.strip().lower().partition("x")
        width, height = int(w), int(h or w)
        if width % 16 or height % 16:
            raise ValueError(f"validation_resolution {part!r}: sides must be multiples of 16")
        out.append((width, height))
    return out


def prompt_library(
    validation_prompt: str | None, user_prompt_library: str | None, instance_prompt: str | None
) -> dict[str, str]:
    """Nickname -> prompt, from ``validation_prompt`` and a JSON library; ``<token>`` = instance prompt."""
    prompts = {}
    if validation_prompt:
        prompts["validation"] = validation_prompt
    if user_prompt_library:
        path = Path(user_prompt_library).expanduser()
        try:
            prompts.update(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise ValueError(f"validation.user_prompt_library: cannot read {path} ({err})") from None
    token = instance_prompt or ""
    return {nick.replace("<token>", token): p.replace("<token>", token) for nick, p in prompts.items()}


class ValidationImages(L.Callback):
    """Generate images with ``diffusers.FluxPipeline`` before training, every n steps and at the end.

    The pipeline gets the training transformer (LoRA active, dropout off), a VAE decoder and
    prompt embeddings read from the datamodule's text cache; no text encoder is loaded. RNG state
    and train mode are restored afterwards, so validation never changes the training trajectory.
    Files: ``<dirpath>/step_<N>/<nickname>_<W>x<H>.png``; a grid per step goes to TensorBoard.
    """

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
    ):
        self.dirpath = Path(dirpath)
        self.prompts = prompt_library(validation_prompt, user_prompt_library, instance_prompt)
        self.every_n_steps = every_n_steps
        self.resolutions = parse_resolutions(validation_resolution)
        self.steps, self.guidance = validation_num_inference_steps, validation_guidance
        self.guidance_real = validation_guidance_real
        self.negative_prompt = validation_negative_prompt
        self.seed, self.before_training = validation_seed, before_training
        self._vae = self._scheduler = None
        self._last_step = -1

    def prompt_texts(self) -> list[str]:
        """Every text this callback needs embedded (so the datamodule caches them)."""
        return [*self.prompts.values(), self.negative_prompt]

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self.before_training and trainer.global_step == 0:
            self.generate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.generate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.generate(trainer, pl_module)

    # -- generation ----------------------------------------------------------------------------
    def _pipeline(self, pl_module):
        from diffusers import FluxPipeline

        from ..components import load_scheduler, load_vae

        if self._vae is None:
            vae = load_vae(pl_module.model_cfg)
            vae.encoder = None  # decoding only
            self._vae, self._scheduler = vae, load_scheduler(pl_module.model_cfg)
        self._vae.to(pl_module.device)
        pipe = FluxPipeline(
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

    @torch.no_grad()
    def generate(self, trainer, pl_module) -> list[Path]:
        """Render every prompt at every resolution for the current step; returns the files."""
        step = trainer.global_step
        if not self.prompts or step == self._last_step or not trainer.is_global_zero:
            return []
        self._last_step = step
        spec = pl_module.model_cfg.spec
        steps = self.steps or spec.validation_steps
        guidance = spec.validation_guidance if self.guidance is None else self.guidance
        real = spec.validation_guidance_real if self.guidance_real is None else self.guidance_real
        embed = trainer.datamodule.prompt_embedding
        negative = embed(self.negative_prompt)
        pipe = self._pipeline(pl_module)
        transformer = pl_module.transformer
        was_training = transformer.training
        device = pl_module.device
        dtype = getattr(pl_module, "compute_dtype", None) or next(transformer.parameters()).dtype
        out_dir = self.dirpath / f"step_{step}"
        out_dir.mkdir(parents=True, exist_ok=True)
        files, images = [], []
        transformer.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for nick, prompt in self.prompts.items():
                    text = embed(prompt)
                    # adapters as for inference (assistant LoRA off) and, for attention-masked
                    # flavours, the T5 mask (joined with the negative prompt's under true CFG)
                    mask = text.get("attention_mask")
                    if mask is not None and real > 1 and "attention_mask" in negative:
                        mask = mask.bool() | negative["attention_mask"].bool()
                    inference = getattr(pl_module, "inference_adapters", None)
                    for width, height in self.resolutions:
                        kwargs = {}
                        if real > 1:
                            kwargs = dict(
                                true_cfg_scale=real,
                                negative_prompt_embeds=negative["prompt_embeds"][None].to(device, dtype),
                                negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"][None].to(device, dtype),
                            )
                        with inference(text_attention_mask=mask) if inference else nullcontext():
                            image = pipe(
                                prompt_embeds=text["prompt_embeds"][None].to(device, dtype),
                                pooled_prompt_embeds=text["pooled_prompt_embeds"][None].to(device, dtype),
                                height=height,
                                width=width,
                                num_inference_steps=steps,
                                guidance_scale=guidance,
                                generator=torch.Generator(device="cpu").manual_seed(self.seed),
                                **kwargs,
                            ).images[0]
                        path = out_dir / f"{nick}_{width}x{height}.png"
                        image.save(path)
                        files.append(path)
                        images.append(image)
        finally:
            transformer.train(was_training)
            if getattr(pl_module.model_cfg, "enable_model_cpu_offload", False):
                self._vae.to("cpu")  # on the accelerator only while decoding
        self._log_grid(trainer, images, step)
        return files

    def _log_grid(self, trainer, images, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        if not images:
            return
        import numpy as np
        from torchvision.utils import make_grid

        tensors = [
            torch.from_numpy(np.array(im.resize(images[0].size))).permute(2, 0, 1) for im in images
        ]
        grid = make_grid(torch.stack(tensors), nrow=min(4, len(tensors)))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("validation/images", grid, step)
