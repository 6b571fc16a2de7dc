"""Compose -> validate -> build -> fit -> return the metric a sweeper minimises."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .callbacks import LoRAExport, ValidationImages
from .components import ModelSourceError
from .config import ConfigError, validate
from .data import DataError, FluxDataModule
from .data.paired import PairedDatasetConfig, PairedFluxDataModule
from .module import FluxLoRAModule

log = logging.getLogger(__name__)


def config_dir() -> str:
    """Absolute path of the Hydra config tree: the checkout's ``conf/`` beside the package when
    running from a source tree, else the copy shipped in the wheel (``flux_lightning.conf``)."""
    checkout = Path(__file__).resolve().parents[1] / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    import flux_lightning.conf as packaged

    return str(Path(packaged.__file__).parent)


def _instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """``lightning.Trainer`` from ``cfg.trainer``; ``precision: null`` = bf16-mixed on GPU, fp32 on CPU."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("_target_", None)
    if kwargs.get("precision") is None:
        gpu = torch.cuda.is_available() and kwargs.get("accelerator") in ("auto", "gpu", "cuda")
        kwargs["precision"] = "bf16-mixed" if gpu else "32-true"
    return L.Trainer(callbacks=callbacks, logger=loggers or False, **kwargs)


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """``latest`` -> the run dir's ``checkpoints/last.ckpt`` if there is one; a path stays a path."""
    if value in (None, "", "none"):
        return None
    if value == "latest":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(value).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} does not exist")
    return value


def train(cfg: DictConfig) -> float:
    """Run one training job described by ``cfg``; returns the final training loss."""
    run = validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    prompts = [p for cb in callbacks if isinstance(cb, ValidationImages) for p in cb.prompt_texts()]
    datamodule_cls = PairedFluxDataModule if isinstance(run.dataset, PairedDatasetConfig) else FluxDataModule
    datamodule = datamodule_cls(run.dataset, run.model, prompts=prompts)
    module = FluxLoRAModule(
        model=run.model,
        adapter=run.adapter,
        timesteps=run.timesteps,
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
    )
    trainer = build_trainer(cfg, callbacks, _instantiate_all(cfg.get("logger")))
    output_dir = cfg.paths.output_dir
    trainer.fit(module, datamodule, ckpt_path=resolve_checkpoint(cfg.get("resume_from_checkpoint"), output_dir))
    loss = module.recent_train_loss()
    if trainer.is_global_zero:
        _print_summary(trainer, output_dir, loss, datamodule.skipped)
    return loss


def _print_summary(trainer: L.Trainer, output_dir: str, loss: float, skipped: int) -> None:
    lora = next((cb.path for cb in trainer.callbacks if isinstance(cb, LoRAExport)), None)
    validation = next((cb.dirpath for cb in trainer.callbacks if isinstance(cb, ValidationImages)), None)
    rows = [
        ("run dir", output_dir),
        ("steps", trainer.global_step),
        ("final train loss (last 50 steps)", f"{loss:.4f}"),
        ("LoRA", lora or "not exported"),
        ("validation images", validation or "off"),
        ("logs", trainer.log_dir or "off"),
        ("images skipped", skipped),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return train(cfg)
    except (ConfigError, DataError, ModelSourceError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
