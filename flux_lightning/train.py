"""Compose -> validate -> build -> fit -> return the metric a sweeper minimises."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from .callbacks import EvalLoss, LoRAExport, LossProgressBar, ModelCard, ValidationImages
from . import stopping
from .atomic_files import AtomicCheckpointIO
from .config import validate
from .data import FluxDataModule
from .errors import USER_ERRORS, ConfigError, NonFiniteLossError, StopRequested
from .data.paired import PairedDatasetConfig, PairedFluxDataModule
from .module import FluxLoRAModule
from .quiet import silence_third_party_noise
from .resume import checkpoint_step
from .schema import register
from .simpletuner_cli import with_simpletuner_config
from .stopping import GracefulStop
from .sweep import RESULT_FILE, write_result

log = logging.getLogger(__name__)
register()  # the config schema (train_schema) and the run_name resolver, before Hydra composes


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
    out = []
    for v in node.values():
        if isinstance(v, DictConfig) and "_target_" in v:
            try:
                out.append(instantiate(v))
            except InstantiationException as err:  # surface our one-line config errors unwrapped
                if isinstance(err.__cause__, ConfigError):
                    raise err.__cause__ from None
                raise
    return out


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """``lightning.Trainer`` from ``cfg.trainer``; ``precision: null`` = bf16-mixed on GPU, fp32 on CPU."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("_target_", None)
    if isinstance(kwargs.get("strategy"), dict):  # a strategy object (e.g. FSDPStrategy with options)
        kwargs["strategy"] = instantiate(cfg.trainer.strategy)
    if kwargs.get("precision") is None:
        gpu = torch.cuda.is_available() and kwargs.get("accelerator") in ("auto", "gpu", "cuda")
        kwargs["precision"] = "bf16-mixed" if gpu else "32-true"
    if kwargs.get("enable_progress_bar") is False:  # Lightning refuses a bar callback when the bar is off
        callbacks = [cb for cb in callbacks if not isinstance(cb, LossProgressBar)]
    plugins = list(kwargs.pop("plugins", None) or []) + [AtomicCheckpointIO()]
    return L.Trainer(callbacks=callbacks, logger=loggers or False, plugins=plugins, **kwargs)


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """``latest`` -> the newest readable checkpoint in the run dir's ``checkpoints/`` (normally
    ``last.ckpt``; a ``step*.ckpt`` when the run died between writing it and ``last.ckpt``, or when
    ``last.ckpt`` is missing, empty or truncated: each unreadable newer file is skipped with a
    warning); a path stays a path, and must be readable.

    Raises:
        ConfigError: the path does not exist or is unreadable, or no checkpoint of the run dir is.
    """
    if value in (None, "", "none"):
        return None
    if value == "latest":
        found = [p for p in (Path(output_dir) / "checkpoints").glob("*.ckpt") if p.is_file()]
        found.sort(key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)
        bad = []
        for path in found:
            try:
                checkpoint_step(path)
            except ValueError as err:
                bad.append(f"{path.name} ({err})")
                continue
            if bad:
                log.warning("resume: skipping unreadable %s; resuming from %s, the newest readable checkpoint", ", ".join(bad), path.name)
            return str(path)
        if bad:
            raise ConfigError(
                f"resume_from_checkpoint: no checkpoint in {Path(output_dir) / 'checkpoints'} is readable "
                f"({', '.join(bad)}); delete them to start afresh, or give another run's with resume_from_checkpoint=<path>"
            )
        return None
    if not Path(value).is_file():
        raise ConfigError(f"resume_from_checkpoint: {value} does not exist; give a .ckpt file, latest or null")
    try:
        checkpoint_step(value)
    except ValueError as err:
        raise ConfigError(f"resume_from_checkpoint: {value} is unreadable ({err}); give another .ckpt file, latest or null") from None
    return value


def announce_resume(ckpt: str | None, step: int | None) -> None:
    """One line saying where training continues from (or nothing when it starts fresh)."""
    if ckpt is not None:
        print(f"resuming from {ckpt} (step {step}); resume_from_checkpoint=null starts afresh", flush=True)


def finished_result(step: int | None, output_dir: str, max_steps: int | None) -> dict | None:
    """The run dir's ``result.json`` when the run already finished: it exists, and the checkpoint to
    resume from (at ``step``) is at ``trainer.max_steps`` and is the one that result was written for."""
    path = Path(output_dir) / RESULT_FILE
    if step is None or not max_steps or max_steps < 0 or not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if step >= max_steps and result.get("steps") == step else None


def train(cfg: DictConfig) -> float:
    """Run one training job described by ``cfg``; returns the metric a sweeper minimises: the final
    stable eval loss when the ``eval_loss`` callback is on, else the final training loss.

    SIGTERM/SIGINT stop it within seconds (:mod:`flux_lightning.stopping`): it raises
    :class:`~flux_lightning.stopping.StopRequested` after writing ``last.ckpt`` at the current step.
    A run dir whose run already finished is left as it is (its stored metric is returned).
    """
    stopping.install()
    try:
        return _train(cfg)
    finally:
        stopping.uninstall()


def _train(cfg: DictConfig) -> float:
    run = validate(cfg)
    output_dir = cfg.paths.output_dir
    ckpt = resolve_checkpoint(cfg.get("resume_from_checkpoint"), output_dir)
    step = checkpoint_step(ckpt) if ckpt is not None else None  # read once: the file was checked above
    done = finished_result(step, output_dir, cfg.trainer.get("max_steps"))
    if done is not None:
        print(
            f"run {output_dir} already finished at step {done['steps']}; nothing to do "
            "(run_name=<new> for a new run, or a larger trainer.max_steps to train on)",
            flush=True,
        )
        return float("nan") if done.get("metric") is None else float(done["metric"])
    L.seed_everything(cfg.seed, workers=True)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    for cb in callbacks:
        if isinstance(cb, ModelCard):
            cb.config_yaml = _resolved_yaml(cfg)
    prompts = [p for cb in callbacks if isinstance(cb, ValidationImages) for p in cb.prompt_texts()]
    evals = [cb for cb in callbacks if isinstance(cb, EvalLoss)]
    datamodule_cls = PairedFluxDataModule if isinstance(run.dataset, PairedDatasetConfig) else FluxDataModule
    datamodule = datamodule_cls(run.dataset, run.model, prompts=prompts, **(evals[0].data_kwargs() if evals else {}))
    module = FluxLoRAModule(
        model=run.model,
        adapter=run.adapter,
        timesteps=run.timesteps,
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        seed=cfg.seed,
        tread=run.tread,
        compile=run.compile,
        nonfinite_max_consecutive=cfg.get("nonfinite_max_consecutive", 10),
    )
    stop = GracefulStop()
    trainer = build_trainer(cfg, [stop, *callbacks], _instantiate_all(cfg.get("logger")))
    if trainer.is_global_zero:
        announce_resume(ckpt, step)
    try:
        trainer.fit(module, datamodule, ckpt_path=ckpt)
    except (StopRequested, SIGTERMException) as err:
        stopped = err if isinstance(err, StopRequested) else StopRequested(signal.SIGTERM)
        stopped.step, stopped.checkpoint = stop.step, stop.checkpoint
        raise stopped from None
    loss = module.recent_train_loss()
    eval_loss = evals[0].last_loss if evals else None
    if trainer.is_global_zero:
        _print_summary(
            trainer, output_dir, loss, datamodule.skipped, eval_loss, datamodule.eval_split,
            nonfinite=module.skipped_nonfinite_steps(),
        )
        write_result(
            output_dir,
            {
                "job": _job_name(),
                "overrides": _task_overrides(),
                "metric_name": "loss/train (last 50 steps)" if eval_loss is None else "loss/val",
                "metric": loss if eval_loss is None else eval_loss,
                "train_loss": loss,
                "steps": trainer.global_step,
                "lora": next((cb.path for cb in trainer.callbacks if isinstance(cb, LoRAExport)), None),
            },
        )
    return loss if eval_loss is None else eval_loss


def _resolved_yaml(cfg: DictConfig) -> str:
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra job
        return OmegaConf.to_yaml(cfg)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _job_name() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "run"
    job = HydraConfig.get().job
    return str(job.get("num", job.name))


def _print_summary(
    trainer: L.Trainer, output_dir: str, loss: float, skipped: int, eval_loss: float | None = None,
    eval_split: str = "off", nonfinite: int = 0,
) -> None:
    lora = next((cb.path for cb in trainer.callbacks if isinstance(cb, LoRAExport)), None)
    validation = next((cb.dirpath for cb in trainer.callbacks if isinstance(cb, ValidationImages)), None)
    rows = [
        ("run dir", output_dir),
        ("steps", trainer.global_step),
        ("final train loss (last 50 steps)", f"{loss:.4f}"),
        ("final eval loss", "off" if eval_loss is None else f"{eval_loss:.4f}"),
        ("eval split", eval_split),
        ("LoRA", lora or "not exported"),
        ("validation images", validation or "off"),
        ("logs", trainer.log_dir or "off"),
        ("images skipped", skipped),
        ("non-finite steps skipped", nonfinite),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)


@with_simpletuner_config  # `simpletuner_config=config.json` -> overrides (flux_lightning/simpletuner_cli.py)
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_third_party_noise()  # Lightning's "Tip:" adverts, torch's LeafSpec FutureWarning (flux_lightning/quiet.py)
    try:
        return train(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLossError as err:  # the guard stopped the run; last.ckpt is the last good state
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(3)
    except StopRequested as err:
        print(stopping.stopped_message(err), file=sys.stderr, flush=True)
        # Every file is written and closed (checkpoint fsynced, loggers finalized by Lightning): skip the
        # interpreter's teardown of torch/diffusers/Lightning, seconds on a busy machine, so the
        # scheduler's SIGKILL never lands on a process that already said it stopped.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(err.exit_code)
