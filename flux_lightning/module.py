"""``FluxLoRAModule``: a frozen Flux transformer with a trainable LoRA, trained by flow matching."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import lightning as L
import torch

from .adapters import AdapterConfig, adapters_disabled, add_lora, export_lora
from .components import ModelConfig, load_transformer
from .flow import (
    TimestepConfig,
    flow_loss,
    flow_target,
    image_ids,
    noisy_latents,
    pack_latents,
    sample_sigmas,
    text_ids,
    unpack_latents,
)
from .tread import TreadConfig, num_blocks, resolve_routes, routed_forward, tokens_in_mask

def rng_states() -> dict:
    """Python, NumPy, torch CPU and CUDA RNG states, as types ``torch.load(weights_only=True)`` reads."""
    import random

    import numpy as np

    name, key, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    name, key, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class FluxLoRAModule(L.LightningModule):
    """Flow-matching LoRA training of a Flux transformer.

    One step, for cached latents ``x0`` ``(B, 16, H, W)`` and text embeddings:
    ``sigma ~ timesteps``, ``noise ~ N(0, I)``, ``x_t = (1 - sigma) x0 + sigma noise``,
    ``v = transformer(pack(x_t), sigma, text)``, ``loss = mean_b mean(|unpack(v) - (noise - x0)|^2)``.

    Only LoRA parameters train; :meth:`state_dict` (and so every checkpoint) holds only them.
    The transformer is built in :meth:`configure_model`, so construction is cheap.

    Args:
        model: where the base weights come from (see :class:`~flux_lightning.components.ModelConfig`).
        adapter: LoRA rank, alpha, dropout, targets, init.
        timesteps: sigma sampling.
        optimizer: ``params -> Optimizer`` (e.g. a Hydra ``_partial_``); default AdamW(lr=1e-4).
        lr_scheduler: ``(optimizer, num_training_steps) -> LRScheduler``; default none.
        seed: seed of the training noise and sigmas (see :meth:`noise_and_sigmas`).
        tread: TREAD token routing during training (see :mod:`flux_lightning.tread`); default off.
        compile: regional ``torch.compile`` of the transformer blocks (see
            :func:`flux_lightning.compilation.compile_blocks`); falls back to eager where unsupported.
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        adapter: AdapterConfig | None = None,
        timesteps: TimestepConfig | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: Callable | None = None,
        seed: int = 0,
        tread: TreadConfig | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.model_cfg = model or ModelConfig()
        self.adapter_cfg = adapter or AdapterConfig()
        self.timesteps = timesteps or TimestepConfig()
        self.tread = tread or TreadConfig()
        self.compile_blocks = compile
        self.save_hyperparameters(
            {
                "model": asdict(self.model_cfg),
                "adapter": asdict(self.adapter_cfg),
                "timesteps": asdict(self.timesteps),
                "tread": asdict(self.tread),
                "compile": compile,
            }
        )
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4)
        self.lr_scheduler_factory = lr_scheduler
        self.noise_seed = seed
        self.transformer: torch.nn.Module | None = None
        self._recent_losses: deque[torch.Tensor] = deque(maxlen=50)

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.transformer is not None:
            return
        transformer = load_transformer(self.model_cfg)
        add_lora(transformer, self.adapter_cfg)
        if self.model_cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if self.tread.routes:
            resolve_routes(self.tread.routes, num_blocks(transformer))  # bad indices fail before step 0
        if self.compile_blocks:
            from .compilation import compile_blocks

            device = self._trainer.strategy.root_device.type if self._trainer is not None else None
            compile_blocks(transformer, device_type=device)
        self.transformer = transformer.train()  # base Flux has no dropout; LoRA dropout needs train()

    def forward(
        self,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        guidance: torch.Tensor | None = None,
        keep_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction ``(B, 16, H, W)`` for noisy latents ``(B, 16, H, W)`` at ``sigmas`` ``(B,)``.

        In train mode with gradients on and ``tread.routes`` set, the transformer runs with TREAD
        routing; ``keep_tokens`` ``(B, H/2 * W/2)`` bool marks image tokens never dropped.
        """
        b, _, h, w = noisy.shape
        dtype = next(self.transformer.parameters()).dtype
        if self.transformer.config.guidance_embeds and guidance is None:
            guidance = torch.full((b,), self.model_cfg.training_guidance, device=noisy.device)
        elif not self.transformer.config.guidance_embeds:
            guidance = None
        inputs = dict(
            hidden_states=pack_latents(noisy).to(dtype),
            timestep=sigmas.to(dtype),
            guidance=None if guidance is None else guidance.to(dtype),
            pooled_projections=pooled_prompt_embeds.to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            txt_ids=text_ids(prompt_embeds.shape[1], device=noisy.device, dtype=dtype),
            img_ids=image_ids(h, w, device=noisy.device, dtype=dtype),
        )
        if self.tread.routes and self.training and torch.is_grad_enabled():
            pred = routed_forward(self.transformer, self.tread.routes, keep_tokens=keep_tokens, **inputs)
        else:
            pred = self.transformer(**inputs, return_dict=False)[0]
        return unpack_latents(pred, h, w)

    def noise_and_sigmas(self, x0: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample noise ``(B, C, H, W)`` and sigmas ``(B,)``, each drawn from its own generator
        seeded by ``(seed, epoch, batch_idx, global sample index)``.

        So a sample's noise does not depend on the batch it shares, the number of devices, or the
        RNG state: a DDP run equals a single-process run of the same global batch, and a resume
        draws exactly what the uninterrupted run drew.
        """
        b, _, h, w = x0.shape
        epoch = self.current_epoch if self._trainer is not None else 0
        first = (self.global_rank if self._trainer is not None else 0) * b
        noise, sigmas = [], []
        for j in range(b):
            key = f"{self.noise_seed}:{epoch}:{batch_idx}:{first + j}"
            g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
            noise.append(torch.randn(x0.shape[1:], generator=g))
            sigmas.append(sample_sigmas(1, self.timesteps, seq_len=(h // 2) * (w // 2), generator=g))
        return torch.stack(noise).to(x0.device, non_blocking=True), torch.cat(sigmas).to(x0.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"].float()
        b = x0.shape[0]
        noise, sigmas = self.noise_and_sigmas(x0, batch_idx)
        noisy = noisy_latents(x0, noise, sigmas)
        text = (batch["prompt_embeds"], batch["pooled_prompt_embeds"])
        mask = batch.get("mask")  # (B, 1, H, W) at latent size: 1 = train, 0 = ignore
        keep = None if mask is None else tokens_in_mask(mask)  # TREAD never drops masked-in tokens
        pred = self(noisy, sigmas, *text, keep_tokens=keep)
        if "is_regularisation" in batch:  # prior preservation: match the base model's own prediction
            with torch.no_grad(), adapters_disabled(self.transformer):
                target = self(noisy, sigmas, *text).float()
        else:
            target = flow_target(x0, noise)
        loss = flow_loss(pred, target, mask).mean()
        # prog_bar=True would make Lightning call .item() every step; LossProgressBar shows it instead
        self.log("loss/train", loss, batch_size=b)
        self._recent_losses.append(loss.detach())
        return loss

    def recent_train_loss(self) -> float:
        """Mean training loss over the last (up to) 50 steps; NaN before the first step."""
        if not self._recent_losses:
            return float("nan")
        return torch.stack(list(self._recent_losses)).mean().item()

    # -- optimisation ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 1
        scheduler = self.lr_scheduler_factory(optimizer=optimizer, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint extras --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Adds the RNG states (LoRA dropout draws from them) so a resume continues exactly."""
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    # -- adapter-only state ------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Only the LoRA tensors: the frozen base never enters a checkpoint."""
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if ".lora_" in k)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"adapter state does not match this model: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]} (was it trained with another adapter.rank/target?)"
            )
        return result

    def export_lora(self, directory: str | Path, **kwargs) -> Path:
        """Write ``<directory>/pytorch_lora_weights.safetensors`` (diffusers keys)."""
        metadata = {
            "flux_lightning.flavour": self.model_cfg.flavour,
            "flux_lightning.guidance_value": str(self.model_cfg.training_guidance),
            "flux_lightning.step": str(self.global_step if self._trainer is not None else 0),
        }
        return export_lora(self.transformer, self.adapter_cfg, directory, extra_metadata=metadata, **kwargs)
