"""Compose -> validate -> instantiate -> fit -> return the metric a sweeper minimises.

Nothing here knows the classes it builds: the module, the datamodule, the trainer, the callbacks
and the loggers are ``_target_`` nodes (``conf/module``, ``conf/data``, ``conf/trainer``, ...), and
the parts meet through the protocols of :mod:`flux_lightning.training.hooks` (see docs/architecture.md):
``SummaryRows`` (the end-of-run table), ``SweepMetric`` (what a sweeper minimises) and
``RecordsRunConfig`` here; ``PromptTexts``, ``EvalSplit``, ... between the parts themselves.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ..atomic_files import AtomicCheckpointIO
from ..callbacks.redaction import redact_secrets
from ..config.schema import config_dir, register, unknown_keys
from ..config.validation import validate
from ..errors import USER_ERRORS, ConfigError, NonFiniteLossError, RankFailed, StopRequested
from ..model.quantization import BNB_PRECISIONS
from ..simpletuner.cli import with_simpletuner_config
from ..training import stopping
from ..training.hooks import RecordsRunConfig, SummaryRows, SweepMetric
from ..training.stopping import GracefulStop
from . import heap, run_identity, timings
from .compose_errors import job_started, one_line_compose_errors
from .hardware import device_summary_rows, resolve_trainer_devices
from .quiet import silence_third_party_noise
from .resume import announce_resume, checkpoint_step, finished_result, resolve_checkpoint
from .rundir import is_global_zero, launcher_rank
from .sweep import write_result

log = logging.getLogger(__name__)
register()  # the config schema (train_schema) and the run_name resolver, before Hydra composes


def _build(node: DictConfig, *args, **kwargs):
    """``instantiate(node, ...)``, with our one-line user errors (a bad value found by a
    constructor) surfaced unwrapped instead of inside Hydra's InstantiationException."""
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise


def _instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not node:
        return []
    return [_build(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """``cfg.trainer`` (``lightning.Trainer`` or a subclass) with the run's callbacks, loggers and
    the atomic checkpoint writer; ``precision: null`` = bf16-mixed on GPU, fp32 on CPU;
    ``devices: auto`` = every visible GPU with DDP, one without, the CPU when there is none
    (:func:`flux_lightning.run.hardware.resolve_trainer_devices`)."""
    devices = resolve_trainer_devices(cfg.trainer)
    if devices and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        log.info("trainer.devices=auto: %s", ", ".join(f"{k}={v}" for k, v in devices.items()))
    precision = cfg.trainer.get("precision")
    if precision is None:
        accelerator = devices.get("accelerator", cfg.trainer.get("accelerator"))
        gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
        precision = "bf16-mixed" if gpu else "32-true"
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback when the bar is off
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    plugins = list(instantiate(cfg.trainer.get("plugins")) or []) + [AtomicCheckpointIO()]
    extra = {}
    if cfg.trainer.get("enable_checkpointing") is None and not any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
        # callbacks.model_checkpoint=null means no checkpoints: Lightning would otherwise add its default
        # ModelCheckpoint, which saves every epoch (every few steps on a small dataset) under the logger's dir
        extra["enable_checkpointing"] = False
    return _build(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=plugins,
        precision=precision,
        **devices,
        **extra,
    )


def train(cfg: DictConfig) -> float:
    """Run one training job described by ``cfg``; returns the metric a sweeper minimises: the final
    stable eval loss when the ``eval_loss`` callback is on, else the final training loss.

    SIGTERM/SIGINT stop it within seconds (:mod:`flux_lightning.training.stopping`): it raises
    :class:`~flux_lightning.training.stopping.StopRequested` after writing ``last.ckpt`` at the current step.
    A run dir whose run already finished is left as it is (its stored metric is returned).
    """
    stopping.install()
    try:
        return _train(cfg)
    finally:
        stopping.uninstall()
        heap.resume_full_collections()  # the command line's start-up ended without a step (heap.py)


def _train(cfg: DictConfig) -> float:
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(
            f"unknown config key {', '.join(unknown)}: not a field of the run (misspelt? `python -m flux_lightning "
            "--cfg job` prints every field); remove it"
        )
    run = validate(cfg)
    timings.mark("validated")
    output_dir = cfg.paths.output_dir
    ckpt = resolve_checkpoint(cfg.get("resume_from_checkpoint"), output_dir)
    step = checkpoint_step(ckpt) if ckpt is not None else None  # read once: the file was checked above
    if ckpt is not None and cfg.get("resume_from_checkpoint") == "latest":  # the dir's own run: the same config?
        run_identity.check(output_dir, cfg, ckpt)
    else:  # a fresh start (or an explicit checkpoint): this dir's run is now this config
        run_identity.record(output_dir, run_identity.identity(cfg))
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
    for cb in callbacks:  # a callback that records the run's config (the model card), when it writes it
        if isinstance(cb, RecordsRunConfig):
            cb.set_run_config(functools.partial(_resolved_yaml, cfg))
    timings.mark("callbacks built")
    datamodule = _build(cfg.data, **run.data_parts())
    timings.mark("datamodule built")
    module = _build(cfg.module, **run.module_parts())
    timings.mark("module built")
    stop = GracefulStop()
    callbacks += timings.instrument(datamodule, module, callbacks)  # FLUX_LIGHTNING_TIMINGS only
    if heap.postponed():  # the command line's start-up (heap.py): full collections again from the first batch
        callbacks.append(_ResumeFullCollections())
    trainer = build_trainer(cfg, [stop, *callbacks], _instantiate_all(cfg.get("logger")))
    timings.mark("trainer built")
    if trainer.is_global_zero:
        announce_resume(ckpt, step)
        announce_forecast(run, trainer)
    try:
        trainer.fit(module, datamodule, ckpt_path=ckpt)
    except (StopRequested, SIGTERMException) as err:
        stopped = err if isinstance(err, StopRequested) else StopRequested(signal.SIGTERM)
        stopped.step, stopped.checkpoint = stop.step, stop.checkpoint
        raise stopped from None
    metric_name, metric = sweep_metric(trainer, module)
    # on every rank: a part's rows may be a collective (trainer.log_dir broadcasts), and a collective
    # called on rank 0 alone, after the other ranks have left, fails the run at its very end
    rows = summary_rows(trainer, module, datamodule, output_dir)
    if trainer.is_global_zero:
        _print_summary(rows)
        write_result(
            output_dir,
            {
                "job": _job_name(),
                "overrides": redact_secrets(_task_overrides()),  # no webhook tokens in the record
                "metric_name": metric_name,
                "metric": metric,
                "train_loss": module.recent_train_loss(),
                "steps": trainer.global_step,
                "summary": dict(rows),
            },
        )
        wait_for_child_ranks(trainer, output_dir)
    return metric


class _ResumeFullCollections(L.Callback):
    """Ends the command line's postponement of full collections (heap.py) when the first batch
    arrives (a job that ends before one: ``train``'s ``finally``)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        heap.resume_full_collections()


def wait_for_child_ranks(trainer: L.Trainer, output_dir: str) -> None:
    """The launching process waits for the DDP ranks Lightning started (its children re-run the
    command), so its exit status is the run's: one that failed raises ``RankFailed`` (exit 1)."""
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    failed = [(rank, proc.wait()) for rank, proc in enumerate(procs, start=1)]
    failed = [(rank, code) for rank, code in failed if code != 0]
    if failed:
        raise RankFailed(
            "; ".join(f"rank {r} exited with {c} (its log: {output_dir}/train_ddp_process_{r}.log)" for r, c in failed)
        )


def announce_forecast(run, trainer: L.Trainer) -> None:
    """One line: the run's peak accelerator memory, forecast before the model loads
    (:mod:`flux_lightning.model.forecast`), and a warning when it exceeds the training GPU's memory."""
    from ..model.forecast import forecast_run, gpu_warnings

    try:
        fc = forecast_run(run)
    except Exception as err:  # noqa: BLE001 - a forecast never stops a run
        log.debug("no VRAM forecast: %s", err)
        return
    device = trainer.strategy.root_device
    print(fc.line("VRAM forecast" if device.type == "cuda" else "memory forecast (model part)"), flush=True)
    if device.type == "cuda":
        from .hardware import detect_accelerators

        for warning in gpu_warnings(fc, [a for a in detect_accelerators() if a.index == (device.index or 0)]):
            print(warning, file=sys.stderr, flush=True)


def sweep_metric(trainer: L.Trainer, module) -> tuple[str, float]:
    """What a sweeper minimises: the first callback's ``sweep_metric()`` that has a value (the
    stable eval loss when ``callbacks.eval_loss`` is on), else the final training loss."""
    for cb in trainer.callbacks:
        found = cb.sweep_metric() if isinstance(cb, SweepMetric) else None
        if found is not None:
            return found
    return "loss/train (last 50 steps)", module.recent_train_loss()


def summary_rows(trainer: L.Trainer, module, datamodule, output_dir: str) -> list[tuple[str, object]]:
    """The end-of-run table: the run's own rows, then every part's ``summary_rows()`` (the module,
    each callback, the datamodule), so a part that is switched off adds nothing."""
    rows: list[tuple[str, object]] = [("run dir", output_dir), ("steps", trainer.global_step)]
    rows += device_summary_rows(trainer)
    for part in (module, *trainer.callbacks, datamodule):
        if isinstance(part, SummaryRows):
            rows += list(part.summary_rows())
    return rows + [("logs", trainer.log_dir or "off")]


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


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _failed(code: int) -> float:
    """Exit with ``code``; a sweep job returns NaN instead (no ``result.json``), so the sweep goes on
    and its summary lists the job as failed (:class:`flux_lightning.run.sweep.SweepSummary`)."""
    if _in_sweep():
        return float("nan")
    sys.exit(code)


def _after_the_launching_process(timeout: float = 60.0) -> None:
    """A DDP rank that Lightning started leaves after the process that started it: that one's child
    watcher (Lightning's) kills every rank with SIGKILL as soon as it sees a child exit non-zero, as
    a stopped rank does (128 + the signal)."""
    if launcher_rank() is not None or is_global_zero():
        return
    parent, deadline = os.getppid(), time.monotonic() + timeout
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.05)


def _print_summary(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)


@one_line_compose_errors  # a command line Hydra cannot compose: one line naming the field, exit 2
@with_simpletuner_config  # `simpletuner_config=config.json` -> overrides (flux_lightning/simpletuner/cli.py)
@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    job_started()
    timings.mark("composed")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Lightning's "Tip:" adverts, torch's LeafSpec FutureWarning, bitsandbytes' CPU-kernel warning (quiet.py)
    silence_third_party_noise(keep_bnb_cpu_warning=cfg.model.quantization.base_model_precision in BNB_PRECISIONS)
    try:
        return train(cfg)
    except USER_ERRORS as err:  # a sweep stops too: a config or data error is most often every job's
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLossError as err:  # the guard stopped the run; last.ckpt is the last good state
        print(f"error: {err}", file=sys.stderr, flush=True)
        return _failed(3)
    except RankFailed as err:  # rank 0 finished and wrote its files; another rank did not
        print(f"error: {err}", file=sys.stderr, flush=True)
        return _failed(1)
    except Exception:
        if not _in_sweep():
            raise
        log.exception("this sweep job failed")  # into the job's log; the sweep goes on
        return float("nan")
    except StopRequested as err:
        _after_the_launching_process()
        if is_global_zero():  # one line, not one per rank
            print(stopping.stopped_message(err), file=sys.stderr, flush=True)
        # Every file is written and closed (checkpoint fsynced, loggers finalized by Lightning): skip the
        # interpreter's teardown of torch/diffusers/Lightning, seconds on a busy machine, so the
        # scheduler's SIGKILL never lands on a process that already said it stopped.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(err.exit_code)
