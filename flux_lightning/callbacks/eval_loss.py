"""Stable eval loss: the flow-matching loss on a held-out split with fixed noise and a fixed sigma grid.

For every eval image ``x0`` and every grid point ``u_k = (k + 1/2) / K`` (k = 0..K-1, default K = 8),
``sigma_k = shift(u_k)`` with the training shift (static, or auto for the image's token count),
``noise ~ N(0, I)`` drawn once per image from a generator seeded with ``seed``, and
``L_k = mean((v(x_t, sigma_k) - (noise - x0))^2)``. Logged: ``loss/val`` (mean over images and
sigmas), ``loss/val/sigma/<u_k>`` and ``loss/val/backend/<name>`` (the backend id of held-out
images, ``eval`` for ``dataset.eval_data_dir``). The adapter runs in eval mode (no dropout), captions are never dropped, masks are off, and every RNG
stream of training is restored, so the same weights give the same number and training is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import lightning as L
import torch

from ..errors import Problem
from ..training import stopping
from ..training.flow import flow_loss, flow_target, noisy_latents, shift_like_training
from ..training.hooks import ConfigChecked, EvalSplit, SummaryRows, SweepMetric, raise_problems
from ..values import is_int
from .isolation import isolated

log = logging.getLogger(__name__)

_FIELD = "callbacks.eval_loss"
_MOVED_EVAL_KEYS = ("eval_fraction", "eval_min_images", "eval_data_dir")  # now dataset.*


def sigma_grid(num_sigmas: int) -> torch.Tensor:
    """``(K,)`` unshifted grid points ``(k + 1/2) / K``: K equal-width buckets of (0, 1), midpoints."""
    return (torch.arange(num_sigmas, dtype=torch.float64) + 0.5) / num_sigmas


@dataclass
class EvalResult:
    """Mean loss overall, per grid point (keyed by the unshifted point) and per backend."""

    loss: float
    per_sigma: dict[float, float] = field(default_factory=dict)
    per_backend: dict[str, float] = field(default_factory=dict)
    images: int = 0

    def metrics(self) -> dict[str, float]:
        out = {"loss/val": self.loss}
        out.update({f"loss/val/sigma/{u:.3f}": v for u, v in self.per_sigma.items()})
        out.update({f"loss/val/backend/{b}": v for b, v in self.per_backend.items()})
        return out


@torch.no_grad()
def stable_eval_loss(module, loader, *, num_sigmas: int = 8, seed: int = 0) -> EvalResult:
    """Evaluate ``module`` (a :class:`~flux_lightning.FluxLoRAModule`) on ``loader`` (fixed order).

    The caller is responsible for eval mode and RNG isolation (see :class:`EvalLoss`); this
    function draws only from its own generator.
    """
    device = module.device
    grid = sigma_grid(num_sigmas)
    generator = torch.Generator().manual_seed(seed)
    bucket_sum = torch.zeros(num_sigmas, dtype=torch.float64)
    backend_sum: dict[str, float] = {}
    backend_count: dict[str, int] = {}
    images = 0
    for batch in loader:
        stopping.check()  # SIGTERM/SIGINT: stop between eval batches
        x0 = batch["latents"].float()
        b, _, h, w = x0.shape
        noise = torch.randn(x0.shape, generator=generator)
        x0, noise = x0.to(device), noise.to(device)
        sigmas = shift_like_training(grid.float(), module.timesteps, seq_len=(h // 2) * (w // 2))
        backends = batch.get("backend") or ["default"] * b
        per_image = torch.zeros(b, dtype=torch.float64)
        for k, sigma in enumerate(sigmas.tolist()):
            s = torch.full((b,), sigma, device=device)
            pred = module(
                noisy_latents(x0, noise, s),
                s,
                batch["prompt_embeds"].to(device),
                batch["pooled_prompt_embeds"].to(device),
            )
            losses = flow_loss(pred, flow_target(x0, noise)).double().cpu()  # (B,)
            bucket_sum[k] += losses.sum()
            per_image += losses
        for name, value in zip(backends, (per_image / num_sigmas).tolist()):
            backend_sum[name] = backend_sum.get(name, 0.0) + value
            backend_count[name] = backend_count.get(name, 0) + 1
        images += b
    if images == 0:
        raise ValueError("the eval loader is empty")
    per_sigma = {round(u, 6): (bucket_sum[k] / images).item() for k, u in enumerate(grid.tolist())}
    return EvalResult(
        loss=(bucket_sum.sum() / (images * num_sigmas)).item(),
        per_sigma=per_sigma,
        per_backend={n: backend_sum[n] / backend_count[n] for n in sorted(backend_sum)},
        images=images,
    )


class EvalLoss(L.Callback):
    """Log the stable eval loss before training, every n steps and at the end.

    The eval split is the data's: ``dataset.eval_fraction``, ``dataset.eval_min_images`` and
    ``dataset.eval_data_dir`` (see :class:`~flux_lightning.data.DatasetConfig`). This callback
    reads it through ``trainer.datamodule.eval_dataloader(batch_size)`` (any DataModule with that
    method; None or no method = no split: one warning, the eval loss is off). :attr:`last_loss` is
    the most recent value (what ``train()`` returns for sweepers).

    Args:
        every_n_steps: evaluate every n optimizer steps (0 = baseline and final only).
        num_sigmas: points of the sigma grid.
        seed: seed of the fixed noise.
        batch_size: eval batch size; null = the training batch size.
        before_training: evaluate at step 0 as a baseline.
    """

    implements = (ConfigChecked, SweepMetric, SummaryRows)  # hooks.py; tests/callbacks/test_hooks.py checks them

    def __init__(
        self,
        every_n_steps: int = 100,
        num_sigmas: int = 8,
        seed: int = 0,
        batch_size: int | None = None,
        before_training: bool = True,
    ):
        raise_problems(
            self.config_problems(
                {"every_n_steps": every_n_steps, "num_sigmas": num_sigmas, "batch_size": batch_size}, field=_FIELD
            )
        )
        self.every_n_steps = every_n_steps
        self.num_sigmas, self.seed, self.batch_size = num_sigmas, seed, batch_size
        self.before_training = before_training
        self.last_loss: float | None = None
        self.history: dict[int, EvalResult] = {}
        self._last_step = -1
        self._warned = False

    @classmethod
    def config_problems(cls, args: Mapping, *, field: str = _FIELD, run=None) -> list[Problem]:
        """Its own arguments; with ``run``, the eval split it needs (``dataset.eval_fraction`` or
        ``dataset.eval_data_dir``) and the split's settings given here (they are ``dataset.*``)."""
        out = []
        v = args.get("every_n_steps", 100)
        if not is_int(v) or v < 0:
            out.append(
                Problem(
                    f"{field}.every_n_steps",
                    f"{field}.every_n_steps={v!r} must be an integer >= 0 (0 = baseline and final only); e.g. 100",
                )
            )
        if args.get("num_sigmas", 8) < 1:
            out.append(Problem(f"{field}.num_sigmas", f"{field}.num_sigmas={args['num_sigmas']} must be >= 1"))
        batch_size = args.get("batch_size")
        if batch_size is not None and batch_size < 1:
            out.append(Problem(f"{field}.batch_size", f"{field}.batch_size={batch_size} must be >= 1 or null"))
        if run is None:
            return out
        out += [
            Problem(f"{field}.{key}", f"{field}.{key} is now dataset.{key}; move it there")
            for key in _MOVED_EVAL_KEYS
            if key in args
        ]
        if run.dataset.eval_fraction == 0 and not run.dataset.eval_folders():
            out.append(
                Problem(
                    "dataset.eval_fraction",
                    f"{field} needs dataset.eval_fraction > 0 or dataset.eval_data_dir=<folder> (or set {field}=null)",
                )
            )
        return out

    def sweep_metric(self) -> tuple[str, float] | None:
        """``("loss/val", the last value)`` once evaluated: what ``train()`` returns for sweepers."""
        return None if self.last_loss is None else ("loss/val", self.last_loss)

    def summary_rows(self) -> list[tuple[str, object]]:
        return [("final eval loss", "off" if self.last_loss is None else f"{self.last_loss:.4f}")]

    # -- checkpointed state: the last value, so a run resumed at its last step reports it ---------
    def state_dict(self) -> dict:
        return {"last_loss": self.last_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_loss = state_dict.get("last_loss", self.last_loss)

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self.before_training and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> EvalResult | None:
        step = trainer.global_step
        if step == self._last_step:
            return self.history.get(step)
        datamodule = trainer.datamodule
        loader = datamodule.eval_dataloader(self.batch_size) if isinstance(datamodule, EvalSplit) else None
        if loader is None:
            if not self._warned:
                split = datamodule.eval_split if isinstance(datamodule, EvalSplit) else "off"
                log.warning(
                    "%s: the datamodule has no eval split (%s); the eval loss is off. Set "
                    "dataset.eval_fraction > 0 (backends with >= dataset.eval_min_images images give some) or "
                    "dataset.eval_data_dir=<folder>, or %s=null",
                    _FIELD,
                    split,
                    _FIELD,
                )
                self._warned = True
            return None
        self._last_step = step
        with isolated(pl_module.transformer):
            result = stable_eval_loss(pl_module, loader, num_sigmas=self.num_sigmas, seed=self.seed)
        self.history[step] = result
        self.last_loss = result.loss
        metrics = result.metrics()
        trainer.callback_metrics["loss/val"] = torch.tensor(result.loss)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        log.info("step %d: eval loss %.6f over %d image(s)", step, result.loss, result.images)
        return result
