"""``FluxLoRAModule``: a frozen Flux transformer with a trainable adapter (LoRA or LoKr), trained by flow
matching (the math: :mod:`flux_lightning.training.flow`; the step in context: docs/architecture.md, "Data flow")."""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import lightning as L
import torch

from ..adapters import (
    AdapterConfig,
    adapters_disabled,
    add_adapter,
    add_assistant_lora,
    assistant_disabled,
    export_adapter,
)
from ..model.components import load_transformer, set_attention_backend, training_attention_backend
from ..model.config import ModelConfig
from ..model.memory import GroupOffload, apply_group_offload, enable_gradient_checkpointing
from ..model.tread import TreadConfig, num_blocks, resolve_routes, routed_forward, tokens_in_mask
from .flow import (
    LossConfig,
    TimestepConfig,
    flow_loss,
    flow_target,
    joint_attention_mask,
    loss_weights,
    noisy_latents,
    sample_sigmas,
    transformer_inputs,
    unpack_latents,
)
from .guard import NonFiniteGuard, all_finite, all_ranks_agree
from .hooks import RendersImages, SummaryRows, TrainableParameters
from .optim import ADAPTER_DTYPES
from .rng import rng_states, set_rng_states
from .rollout import ScheduledSamplingConfig, rollout, rollout_offsets, rollout_path, sigma_grid

log = logging.getLogger(__name__)


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class FluxLoRAModule(L.LightningModule):
    """Flow-matching LoRA training of a Flux transformer.

    One step, for cached latents ``x0`` ``(B, 16, H, W)`` and text embeddings:
    ``sigma ~ timesteps``, ``noise ~ N(0, I)``, ``x_t = (1 - sigma) x0 + sigma noise``,
    ``v = transformer(pack(x_t), sigma, text)``, ``loss = mean_b mean(|unpack(v) - (noise - x0)|^2)``.

    Only adapter parameters train; :meth:`state_dict` (and so every checkpoint) holds only them,
    never the (possibly quantized) base or a frozen assistant LoRA. The transformer is built in
    :meth:`configure_model`, so construction is cheap.

    Flavour behaviour comes from ``model.spec``: the embedded guidance (constant or drawn per sample
    from a range), the T5 padding mask passed to attention (``batch["attention_mask"]``, extended
    with ones for the image tokens), and kontext's reference tokens (``batch["reference_latents"]``
    packed after the image tokens, ids' channel 0 = 1, prediction cut back to the image tokens).

    Args:
        model: where the base weights come from (see :class:`~flux_lightning.model.config.ModelConfig`).
        adapter: LoRA rank, alpha, dropout, targets, init.
        timesteps: sigma sampling.
        optimizer: ``params -> Optimizer`` (e.g. a Hydra ``_partial_``); default AdamW(lr=1e-4).
        lr_scheduler: ``(optimizer, num_training_steps) -> LRScheduler``; default none.
        seed: seed of the training noise and sigmas (see :meth:`noise_and_sigmas`).
        tread: TREAD token routing during training (see :mod:`flux_lightning.model.tread`); default off.
        compile: regional ``torch.compile`` of the transformer blocks (see
            :func:`flux_lightning.model.compilation.compile_blocks`); falls back to eager where unsupported.
        loss: the per-element loss (l2, huber, smooth_l1; see :class:`~flux_lightning.training.flow.LossConfig`).
        scheduled_sampling: rollout of some samples with the current weights before the step (see
            :mod:`flux_lightning.training.rollout`); default off.
        nonfinite_max_consecutive: a step with a non-finite loss, gradient or result is skipped and
            counted (``train/skipped_nonfinite``); this many in a row stop the run with
            :class:`~flux_lightning.training.guard.NonFiniteLossError` (see :mod:`flux_lightning.training.guard`).
    """

    implements = (
        SummaryRows,
        TrainableParameters,
        RendersImages,
    )  # hooks.py; tests/callbacks/test_hooks.py checks them

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
        nonfinite_max_consecutive: int = 10,
        loss: LossConfig | None = None,
        scheduled_sampling: ScheduledSamplingConfig | None = None,
    ):
        super().__init__()
        self.model_cfg = model or ModelConfig()
        self.adapter_cfg = adapter or AdapterConfig()
        self.timesteps = (timesteps or TimestepConfig()).for_flavour(self.model_cfg.spec.fast_schedule)
        self.tread = tread or TreadConfig()
        self.compile_blocks = compile
        self.loss_cfg = loss or LossConfig()
        self.scheduled_sampling = scheduled_sampling or ScheduledSamplingConfig()
        self.save_hyperparameters(
            {
                "model": asdict(self.model_cfg),
                "adapter": asdict(self.adapter_cfg),
                "timesteps": asdict(self.timesteps),
                "tread": asdict(self.tread),
                "compile": compile,
                "loss": asdict(self.loss_cfg),
                "scheduled_sampling": asdict(self.scheduled_sampling),
            }
        )
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-4)
        self.lr_scheduler_factory = lr_scheduler
        self.noise_seed = seed
        self.transformer: torch.nn.Module | None = None
        self.group_offload: GroupOffload | None = None
        self.training_attention = self.model_cfg.attention_backend  # see configure_model
        self._recent_losses: deque[torch.Tensor] = deque(maxlen=50)
        self.nonfinite = NonFiniteGuard(nonfinite_max_consecutive)
        self._log_now = True  # whether this step's values reach the loggers (set in training_step)
        self._trainable: tuple[torch.nn.Module, dict[str, torch.nn.Parameter], list[torch.nn.Parameter]] | None = None
        self._lora_casting: tuple[torch.nn.Module, list[torch.nn.Module], bool] | None = None  # see lora_input_casting

    # -- model -------------------------------------------------------------------------------
    @property
    def adapter_dtype(self) -> torch.dtype:
        """Dtype the trainable adapter weights are held in (``adapter.weight_dtype``, default fp32)."""
        return ADAPTER_DTYPES[self.adapter_cfg.weight_dtype or "fp32"]

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype the transformer computes in (its input embedder's, which is never quantized)."""
        return self.transformer.x_embedder.weight.dtype

    def configure_model(self) -> None:
        if self.transformer is not None:
            return
        transformer = load_transformer(self.model_cfg)  # quantized and attention backend set
        assistant = self.model_cfg.assistant_lora
        if assistant:
            add_assistant_lora(transformer, *assistant)
        add_adapter(transformer, self.adapter_cfg, dtype=self.adapter_dtype)
        if self.model_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(
                transformer,
                self.model_cfg.gradient_checkpointing_interval,
                early_stop=not self.model_cfg.enable_group_offload,
            )
        if self.tread.routes:
            resolve_routes(self.tread.routes, num_blocks(transformer))  # bad indices fail before step 0
        device = self._training_device()
        self._set_training_attention(transformer, device)
        if self.model_cfg.enable_group_offload:  # before Lightning's model_to_device: never whole on the GPU
            if self._trainer is not None and self._trainer.world_size > 1:
                raise RuntimeError(
                    "model.enable_group_offload trains on one device (DistributedDataParallel needs every "
                    "parameter on the GPU); set trainer.devices=1 or model.enable_group_offload=false"
                )
            self.group_offload = apply_group_offload(transformer, self.model_cfg, device)
        if self.compile_blocks:
            from ..model.compilation import compile_blocks

            compile_blocks(transformer, device_type=device.type if self._trainer is not None else None)
        self.transformer = transformer.train()  # base Flux has no dropout; LoRA dropout needs train()

    def _set_training_attention(self, transformer: torch.nn.Module, device: torch.device) -> None:
        """Training attends with ``model.attention_backend`` where its kernel has a backward pass on
        ``device``, else with sdpa (the chosen backend then renders validation images only)."""
        self.training_attention = training_attention_backend(self.model_cfg.attention_backend, device.type)
        if self.training_attention != self.model_cfg.attention_backend:
            log.info(
                "model.attention_backend=%s has no backward pass on %s: training attends with %s, "
                "validation images render with %s",
                self.model_cfg.attention_backend,
                device.type,
                self.training_attention,
                self.model_cfg.attention_backend,
            )
            set_attention_backend(transformer, self.training_attention)

    def _training_device(self) -> torch.device:
        if self._trainer is not None:
            return self._trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _apply(self, fn, recurse: bool = True):
        """Every device/dtype move of the module (Lightning's ``model_to_device`` included) leaves the
        group-offloaded weights to their hooks."""
        offload = self.__dict__.get("group_offload")
        with offload.hidden() if offload is not None else nullcontext():
            return super()._apply(fn, recurse)

    def forward(
        self,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        guidance: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        keep_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction ``(B, 16, H, W)`` for noisy latents ``(B, 16, H, W)`` at ``sigmas`` ``(B,)``.

        Args:
            guidance: ``(B,)`` embedded guidance; None = the training guidance (only for
                transformers with a guidance embedding, ignored otherwise).
            attention_mask: ``(B, T)`` T5 padding mask (1 = token); image (and reference) tokens
                are always attended. Masked text tokens cannot influence any other token.
            reference_latents: ``(B, 16, H_r, W_r)`` clean reference latents (kontext); their
                ``H_r/2 * W_r/2`` tokens follow the image tokens with ids ``(1, row, col)``.
            keep_tokens: ``(B, H/2 * W/2)`` bool, image tokens TREAD never drops (in train mode
                with gradients on and ``tread.routes`` set the transformer runs routed).
        """
        b, _, h, w = noisy.shape
        dtype = self.compute_dtype
        device = noisy.device
        self.lora_input_casting(not torch.is_autocast_enabled(device.type))
        if self.transformer.config.guidance_embeds and guidance is None:
            guidance = torch.full((b,), self.model_cfg.training_guidance, device=device)
        elif not self.transformer.config.guidance_embeds:
            guidance = None
        inputs = transformer_inputs(
            noisy,
            sigmas,
            prompt_embeds,
            pooled_prompt_embeds,
            dtype=dtype,
            guidance=guidance,
            attention_mask=attention_mask,
            reference_latents=reference_latents,
        )
        n_image = (h // 2) * (w // 2)
        extra = inputs["hidden_states"].shape[1] - n_image
        if keep_tokens is not None and extra:  # reference tokens are always kept
            keep_tokens = torch.cat([keep_tokens, keep_tokens.new_ones(b, extra)], dim=1)
        if self.tread.routes and self.training and torch.is_grad_enabled():
            pred = routed_forward(self.transformer, self.tread.routes, keep_tokens=keep_tokens, **inputs)
        else:
            pred = self.transformer(**inputs, return_dict=False)[0]
        return unpack_latents(pred[:, :n_image], h, w)

    def lora_input_casting(self, enabled: bool) -> None:
        """Whether PEFT casts a LoRA layer's input to the adapter's dtype (its default: on).

        Under autocast (``bf16-mixed``) with fp32 adapter weights on a bf16 base, PEFT casts each
        layer's bf16 input to fp32 and autocast casts it straight back to bf16 for the matmul: the
        same values, but every LoRA layer then keeps its own bf16 copy of its input for the backward
        pass instead of sharing the base layer's (about 30 x width bytes per token over one double
        and two single FLUX.1 blocks: ~190 MiB at 512 px for three blocks; see benchmarks/README.md).
        :meth:`forward` turns the cast off under autocast and on without it (the same values reach
        the same bf16 matmul either way); validation renders (:meth:`inference_adapters`) get PEFT's
        default. DoRA layers keep it."""
        cached = self._lora_casting
        if cached is None or cached[0] is not self.transformer:
            from peft.tuners.lora.layer import LoraLayer

            layers = (
                [m for m in self.transformer.modules() if isinstance(m, LoraLayer) and not any(m.use_dora.values())]
                if self.transformer is not None
                else []
            )
            cached = self._lora_casting = (self.transformer, layers, True)
        if cached[2] == enabled:
            return
        for layer in cached[1]:
            layer.cast_input_dtype_enabled = enabled
        self._lora_casting = (cached[0], cached[1], enabled)

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The optional inputs this flavour takes from a batch (attention mask, reference latents)."""
        spec, out = self.model_cfg.spec, {}
        if self.model_cfg.attention_masked:
            if "attention_mask" not in batch:
                raise KeyError("attention-masked training needs batch['attention_mask'] (the T5 padding mask)")
            out["attention_mask"] = batch["attention_mask"]
        if spec.reference_conditioning:
            if "reference_latents" not in batch:
                raise KeyError(
                    f"flavour {spec.mimics or spec.name} trains on image pairs: the batch needs "
                    "'reference_latents' (use a paired dataset, e.g. dataset=kontext_pairs)"
                )
            out["reference_latents"] = batch["reference_latents"].float()
        return out

    def noise_and_sigmas(self, x0: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample noise ``(B, C, H, W)`` and sigmas ``(B,)``, each drawn from its own generator
        seeded by ``(seed, epoch, batch_idx, global sample index)``.

        So a sample's noise does not depend on the batch it shares, the number of devices, or the
        RNG state: a DDP run equals a single-process run of the same global batch, and a resume
        draws exactly what the uninterrupted run drew.
        """
        b, _, h, w = x0.shape
        noise, sigmas = [], []
        for g in self.sample_generators(b, batch_idx):
            noise.append(torch.randn(x0.shape[1:], generator=g))
            sigmas.append(sample_sigmas(1, self.timesteps, seq_len=(h // 2) * (w // 2), generator=g))
        return torch.stack(noise).to(x0.device, non_blocking=True), torch.cat(sigmas).to(x0.device)

    def sample_generators(self, b: int, batch_idx: int, purpose: str = "") -> list[torch.Generator]:
        """One CPU generator per sample of the batch, seeded by ``(seed, epoch, batch_idx, global sample
        index)`` (+ ``:purpose`` for draws other than the noise and sigma, e.g. ``rollout``)."""
        epoch = self.current_epoch if self._trainer is not None else 0
        first = (self.global_rank if self._trainer is not None else 0) * b
        keys = (
            f"{self.noise_seed}:{epoch}:{batch_idx}:{first + j}" + (f":{purpose}" if purpose else "") for j in range(b)
        )
        return [torch.Generator().manual_seed(int(hashlib.sha256(k.encode()).hexdigest()[:15], 16)) for k in keys]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"].float()
        b = x0.shape[0]
        noise, sigmas = self.noise_and_sigmas(x0, batch_idx)
        noisy = noisy_latents(x0, noise, sigmas)
        text = (batch["prompt_embeds"], batch["pooled_prompt_embeds"])
        extra = dict(guidance=self.model_cfg.sample_guidance(b, device=x0.device), **self.conditioning(batch))
        if self.scheduled_sampling.enabled:
            noisy = self.rolled_out(noisy, x0, noise, sigmas, batch_idx, text, extra)
        mask = batch.get("mask")  # (B, 1, H, W) at latent size: 1 = train, 0 = ignore
        keep = None if mask is None else tokens_in_mask(mask)  # TREAD never drops masked-in tokens
        pred = self(noisy, sigmas, *text, keep_tokens=keep, **extra)
        if "is_regularisation" in batch:  # prior preservation: match the base model's own prediction
            with torch.no_grad(), adapters_disabled(self.transformer):
                target = self(noisy, sigmas, *text, **extra).float()
        else:
            target = flow_target(x0, noise)
        loss = flow_loss(pred, target, mask, self.loss_cfg)
        weights = loss_weights(self.timesteps, sigmas)  # None unless timesteps.weighting_scheme weights the loss
        loss = (loss if weights is None else loss * weights.to(loss.device)).mean()
        # prog_bar=True would make Lightning call .item() every step; LossProgressBar shows it instead.
        # Lightning writes logs every trainer.log_every_n_steps: a value logged between is never seen.
        self._log_now = self._logs_this_step()
        if self._log_now:
            self.log("loss/train", loss, batch_size=b)
        self._recent_losses.append(loss.detach())
        self.nonfinite.observe(loss, [x0, *text])
        return loss

    # -- scheduled sampling (flux_lightning/training/rollout.py) ------------------------------------------
    def rollout_generators(self, b: int, batch_idx: int) -> list[torch.Generator]:
        """The rollout decision's generators, keyed like the noise (plus ``:rollout``): a resume rolls
        out what the uninterrupted run did, DDP as one process."""
        return self.sample_generators(b, batch_idx, "rollout")

    def rolled_out(self, noisy, x0, noise, sigmas, batch_idx, text, extra) -> torch.Tensor:
        """``noisy`` with the rolled-out samples replaced: each is noised to its source sigma and
        denoised by the current weights (no gradient, adapters on, dropout off, the step's
        conditioning ``extra``) along the grid down to its training sigma. Reads the batch's sigmas on
        the host (the paths are Python lists), only in a step where some sample rolls out."""
        b, _, h, w = x0.shape
        cfg = self.scheduled_sampling
        step = self.global_step if self._trainer is not None else 0
        offsets = rollout_offsets(cfg, step, self.rollout_generators(b, batch_idx))
        if not any(offsets):
            return noisy
        grid = sigma_grid(cfg, self.timesteps, (h // 2) * (w // 2))
        paths = [rollout_path(grid, s, k) for s, k in zip(sigmas.tolist(), offsets)]
        source = torch.tensor([p[0] for p in paths], device=x0.device, dtype=sigmas.dtype)

        def velocity(x, s, rows):
            picked = {k: v[rows] if torch.is_tensor(v) else v for k, v in extra.items()}
            return self(x, s, text[0][rows], text[1][rows], **picked)

        was_training = self.transformer.training
        self.transformer.eval()
        try:
            with torch.no_grad():
                return rollout(velocity, noisy_latents(x0, noise, source), paths, cfg.sampler).to(noisy.dtype)
        finally:
            self.transformer.train(was_training)

    def recent_train_loss(self) -> float:
        """Mean finite training loss over the last (up to) 50 steps; NaN before the first (finite) step."""
        if not self._recent_losses:
            return float("nan")
        losses = torch.stack(list(self._recent_losses))
        return losses[losses.isfinite()].mean().item()

    # -- non-finite guard (flux_lightning/training/guard.py) -------------------------------------------
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step (closure, clipping, update) under the non-finite guard: a step whose loss,
        gradients or new weights are not finite leaves weights and optimizer state as they were."""
        self.nonfinite.step(
            optimizer,
            lambda: optimizer.step(closure=optimizer_closure),
            params=self.trainable_parameters(),
            all_reduce=all_ranks_agree if self.trainer.world_size > 1 else None,
        )
        if self._logs_this_step():  # a host read at logging steps only
            self.nonfinite.check(self.global_step + 1, self.trainer.precision)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, also for a fused optimizer under ``bf16-mixed``.

        Lightning refuses to clip for an optimizer that unscales its gradients itself (torch's fused
        AdamW, our default) under any mixed precision, because fp16's GradScaler would have to
        unscale first. bf16-mixed has no scaler, so the gradients are already true: clip them as
        Lightning does in full precision. fp16 keeps Lightning's refusal."""
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling
        from lightning.pytorch.utilities import GradClipAlgorithmType

        plugin = self.trainer.precision_plugin
        if (
            gradient_clip_val
            and isinstance(plugin, MixedPrecision)
            and plugin.scaler is None
            and _optimizer_handles_unscaling(optimizer)
        ):
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step under way reaches the loggers (every ``log_every_n_steps``-th
        step and the last); ``self.log`` costs milliseconds, which a small model's step notices.
        Lightning counts the step once ``optimizer_step`` returns, hence ``global_step + 1``."""
        if self._trainer is None:
            return True
        step = self.trainer.global_step + 1
        return step % max(1, self.trainer.log_every_n_steps) == 0 or step >= self.trainer.max_steps > 0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.nonfinite.skipped is not None and self._log_now:
            self.log("train/skipped_nonfinite", self.nonfinite.skipped.clone(), on_step=True, on_epoch=False)

    def on_train_end(self) -> None:
        self.nonfinite.resolve()

    def skipped_nonfinite_steps(self) -> int:
        """How many optimizer steps the non-finite guard skipped (a host read; for the summary)."""
        return self.nonfinite.counts()[0]

    def summary_rows(self) -> list[tuple[str, object]]:
        """Rows of the end-of-run table."""
        return [
            ("final train loss (last 50 steps)", f"{self.recent_train_loss():.4f}"),
            ("non-finite steps skipped", self.skipped_nonfinite_steps()),
        ]

    # -- optimisation ------------------------------------------------------------------------
    def trainable_named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Name -> parameter of the adapter's trainable tensors, found once per transformer: every
        step's guard (and an EMA) needs them, and walking every module of a Flux transformer costs
        milliseconds."""
        if self._trainable is None or self._trainable[0] is not self.transformer:
            named = self._trainable_named()
            self._trainable = (self.transformer, named, list(named.values()))
        return self._trainable[1]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's parameters (:meth:`trainable_named_parameters`' values, as a list)."""
        self.trainable_named_parameters()
        return self._trainable[2]

    @contextmanager
    def inference_adapters(self, text_attention_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Set the transformer up for rendering images (validation) inside the block.

        The frozen assistant LoRA is switched off (images show what the trained adapter does), the
        attention backend is ``model.attention_backend`` even where training attends with another
        one (a kernel without a backward pass), and for attention-masked flavours every transformer
        call gets ``text_attention_mask`` ``(T,)`` or ``(1, T)``, extended with ones for the image
        tokens, whatever pipeline calls it. Everything is restored on exit.
        """
        self.lora_input_casting(True)  # pipelines call the transformer directly, maybe without autocast
        render_attention = self.model_cfg.attention_backend
        switch = render_attention != self.training_attention
        handle = None
        if text_attention_mask is not None and self.model_cfg.attention_masked:
            text_mask = text_attention_mask.reshape(1, -1)

            def add_mask(module, args, kwargs):
                hidden = kwargs["hidden_states"]
                mask = joint_attention_mask(text_mask.to(hidden.device), hidden.shape[1], hidden.shape[0])
                kwargs["joint_attention_kwargs"] = {
                    **(kwargs.get("joint_attention_kwargs") or {}),
                    "attention_mask": mask,
                }
                return args, kwargs

            handle = self.transformer.register_forward_pre_hook(add_mask, with_kwargs=True)
        try:
            if switch:
                set_attention_backend(self.transformer, render_attention)
            with assistant_disabled(self.transformer):
                yield
        finally:
            if switch:
                set_attention_backend(self.transformer, self.training_attention)
            if handle is not None:
                handle.remove()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 1
        scheduler = self.lr_scheduler_factory(optimizer=optimizer, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint extras --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Adds the RNG states (LoRA dropout draws from them) so a resume continues exactly, and the
        recent losses, so a run resumed at its last step still reports its final loss (not NaN);
        refuses (stops the run) when the non-finite guard's limit was reached since its last check."""
        if self._trainer is not None:
            self.nonfinite.check(self.global_step, self.trainer.precision)
        checkpoint["rng_states"] = rng_states()
        losses = list(self._recent_losses)
        checkpoint["recent_train_losses"] = torch.stack(losses).float().cpu().tolist() if losses else []

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        self._recent_losses.clear()
        self._recent_losses.extend(
            torch.tensor(v, device=self.device) for v in checkpoint.get("recent_train_losses", [])
        )

    # -- adapter-only state ------------------------------------------------------------------
    def _trainable_named(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs):
        """Only the trained adapter's tensors: the frozen (possibly quantized) base and the frozen
        assistant LoRA never enter a checkpoint."""
        trainable = self._trainable_named()
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if k in trainable)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy adapter tensors into the trainable parameters (the base is never touched, so this
        also works on quantized bases)."""
        params = self._trainable_named()
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        wrong = [k for k in state_dict if k in params and tuple(state_dict[k].shape) != tuple(params[k].shape)]
        if strict and (missing or unexpected or wrong):
            raise RuntimeError(
                f"adapter state does not match this model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, other shapes {wrong[:5]} (was it trained with another adapter.rank/target?)"
            )
        with torch.no_grad():
            for key, value in state_dict.items():
                if key in params and key not in wrong:
                    params[key].copy_(value.to(params[key].dtype))
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def export_adapter(self, directory: str | Path, **kwargs) -> Path:
        """Write ``<directory>/pytorch_lora_weights.safetensors``: diffusers keys for a LoRA, the
        LyCORIS layout for a LoKr (see :mod:`flux_lightning.adapters.lokr`). Refuses non-finite weights."""
        if not bool(all_finite(self.trainable_parameters())):
            raise ValueError("the adapter weights contain NaN/inf; refusing to write them as a LoRA")
        metadata = {
            "flux_lightning.flavour": self.model_cfg.flavour,
            "flux_lightning.guidance_value": str(self.model_cfg.training_guidance),
            "flux_lightning.guidance_mode": self.model_cfg.flux_guidance_mode,
            "flux_lightning.model.quantization": self.model_cfg.quantization.base_model_precision,
            "flux_lightning.step": str(self.global_step if self._trainer is not None else 0),
        }
        if self.model_cfg.tiny_like:
            metadata["flux_lightning.tiny_like"] = self.model_cfg.tiny_like
        return export_adapter(self.transformer, self.adapter_cfg, directory, extra_metadata=metadata, **kwargs)
