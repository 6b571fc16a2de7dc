"""Write the adapter file (LoRA or LoKr) with every checkpoint and at the end of training, without
ever costing the run."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L

from ..adapters import ADAPTER_FILENAME, LORA_FORMATS, lora_format_problems
from ..atomic_files import link_atomic
from ..errors import AdapterExportError, Problem
from ..model.config import DTYPES
from ..training.hooks import ConfigChecked, ExtraExports, SummaryRows, raise_problems
from ..training.strategies import full_parameters, is_sharded

log = logging.getLogger(__name__)
_FIELD = "callbacks.adapter_export"

STEP_DIR_PREFIX = "step_"  # <dirpath>/step_000500/pytorch_lora_weights.safetensors: a checkpoint's adapter


class AdapterExport(L.Callback):
    """Keeps ``<dirpath>/pytorch_lora_weights.safetensors`` current (rank 0 only), and any further file a
    callback asks for through ``extra_exports(pl_module)`` (``callbacks.ema.export``:
    ``pytorch_lora_weights_ema.safetensors``, the adapter EMA's weights in the same format and dtype).

    Exporting never costs a run: the format is checked against ``adapter.target`` in :meth:`setup`
    (before any weights load; ``train()`` checks it even earlier, in config validation), and an
    error while writing is logged with the path and does not stop training or the checkpoint being
    saved. If the last export attempt failed, :meth:`teardown` raises :class:`AdapterExportError` once
    everything else, ``last.ckpt`` included, is written, so the process exits non-zero; re-running
    the same command resumes from ``last.ckpt`` at the final step and exports without training.

    Args:
        dirpath: output folder, usually ``<run dir>/lora``.
        with_checkpoints: also export whenever Lightning saves a checkpoint.
        lora_format: ``diffusers`` (default), ``comfyui`` or ``kohya`` key layout of a LoRA (a LoKr
            is always written in the LyCORIS layout).
        dtype: tensor dtype in the file: ``bf16`` (default: half the size, what trainers ship),
            ``fp16`` or ``fp32`` (bit-exact with the training weights, so images from the file
            equal the final validation images; the ``diffusers`` layout's folded ``(alpha/r) B`` is
            exact when ``alpha / r`` is a power of two, e.g. alpha = rank, else within fp32 rounding).
    """

    implements = (ConfigChecked, SummaryRows)  # hooks.py; tests/callbacks/test_hooks.py checks them

    def __init__(
        self, dirpath: str, with_checkpoints: bool = True, lora_format: str = "diffusers", dtype: str = "bf16"
    ):
        raise_problems(self.config_problems({"lora_format": lora_format, "dtype": dtype}, field=_FIELD))
        self.dirpath = Path(dirpath)
        self.with_checkpoints = with_checkpoints
        self.lora_format = lora_format
        self.dtype = DTYPES[dtype]
        self.path: Path | None = None  # the file written by the last successful export
        self.error: str | None = None  # why the last export attempt failed (None: it did not)
        self._exported_step: int | None = None

    @classmethod
    def config_problems(cls, args: Mapping, *, field: str = _FIELD, run=None) -> list[Problem]:
        """An unknown format or dtype; with ``run``, a format that cannot name the modules
        ``adapter.target`` selects (or a DoRA in a layout without its magnitudes)."""
        out = []
        lora_format, dtype = args.get("lora_format", "diffusers"), args.get("dtype", "bf16")
        if lora_format not in LORA_FORMATS:
            out.append(
                Problem(
                    f"{field}.lora_format",
                    f"{field}.lora_format={lora_format!r} is unknown; use {', '.join(LORA_FORMATS)}",
                )
            )
        if dtype not in DTYPES:
            out.append(Problem(f"{field}.dtype", f"{field}.dtype={dtype!r} is unknown; use {', '.join(DTYPES)}"))
        if run is not None:
            out += lora_format_problems(lora_format, run.adapter, field=f"{field}.lora_format")
        return out

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse a format that cannot name the targeted modules, before the weights load."""
        raise_problems(lora_format_problems(self.lora_format, pl_module.adapter_cfg, field=f"{_FIELD}.lora_format"))

    def _export(self, trainer: L.Trainer, pl_module) -> None:
        if not is_sharded(trainer):
            if trainer.is_global_zero and not (self._exported_step == trainer.global_step and self.error is None):
                self._write(trainer, pl_module)
            return
        # sharded parameters (FSDP, ZeRO-3): every rank gathers them (a collective), rank 0 writes
        if self._exported_step == trainer.global_step:
            return
        with full_parameters(trainer, pl_module):
            if trainer.is_global_zero:
                self._write(trainer, pl_module)
        self._exported_step = trainer.global_step

    def _write(self, trainer: L.Trainer, pl_module) -> None:
        target = self.dirpath / ADAPTER_FILENAME
        try:
            self.path = pl_module.export_adapter(self.dirpath, dtype=self.dtype, lora_format=self.lora_format)
            for filename, weights in self._extra_exports(trainer, pl_module):
                target = self.dirpath / filename
                with weights:
                    pl_module.export_adapter(
                        self.dirpath, dtype=self.dtype, lora_format=self.lora_format, filename=filename
                    )
        except Exception as err:  # disk full, permissions, a format error: never lose the run for it
            self.path = None
            self.error = f"writing {target} failed at step {trainer.global_step} ({type(err).__name__}: {err})"
            # a full or read-only disk is one line (the file there is intact); anything else, the traceback
            log.error(
                "callbacks.adapter_export: %s; training and checkpoints continue",
                self.error,
                exc_info=not isinstance(err, OSError),
            )
            return
        self.error, self._exported_step = None, trainer.global_step

    @staticmethod
    def _extra_exports(trainer, pl_module) -> list:
        """Further files from callbacks with ``extra_exports(pl_module)`` (the adapter EMA's
        ``pytorch_lora_weights_ema.safetensors``): ``(file name, weights context)`` pairs, written in
        the main file's format and dtype."""
        out = []
        for callback in trainer.callbacks:
            if isinstance(callback, ExtraExports):
                out += callback.extra_exports(pl_module)
        return out

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.with_checkpoints:
            self._export(trainer, pl_module)
            self._keep_step_copy(trainer)

    def _keep_step_copy(self, trainer) -> None:
        """``<dirpath>/step_<N>/<file>``: each checkpoint's adapter files (the main one, the EMA's) as their
        own loadable files, hard links of the files just written (a later export replaces the main file
        by a new one, so the link keeps this step's); the newest ``save_top_k`` of the run's
        ModelCheckpoint are kept, like its checkpoints (``-1``: all)."""
        if not trainer.is_global_zero or self.error is not None or self._exported_step != trainer.global_step:
            return
        step_dir = self.dirpath / f"{STEP_DIR_PREFIX}{trainer.global_step:06d}"
        try:
            step_dir.mkdir(parents=True, exist_ok=True)
            for source in [self.dirpath / ADAPTER_FILENAME] + [
                self.dirpath / f for f, _ in self._extra_exports(trainer, trainer.lightning_module)
            ]:
                if source.is_file():
                    link_atomic(source, step_dir / source.name)
            self._prune(trainer)
        except OSError as err:  # never lose the run for a copy; the main file is written
            log.error(
                "callbacks.adapter_export: keeping %s failed (%s); training and checkpoints continue", step_dir, err
            )

    def _prune(self, trainer) -> None:
        import shutil

        from lightning.pytorch.callbacks import ModelCheckpoint

        ckpt = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
        keep = -1 if ckpt is None else ckpt.save_top_k
        if keep < 0:
            return
        steps = sorted(p for p in self.dirpath.glob(f"{STEP_DIR_PREFIX}*") if p.is_dir())
        for old in steps[: max(len(steps) - max(keep, 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        # a run resumed from a checkpoint at max_steps skips the training loop and on_train_end
        self._export(trainer, pl_module)

    def summary_rows(self) -> list[tuple[str, object]]:
        return [("adapter", self.path or "not exported")]

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.error is not None:
            error, self.error = self.error, None
            raise AdapterExportError(
                f"callbacks.adapter_export: {error}. Training finished and its checkpoints are saved: fix the "
                "cause and re-run the same command (it resumes from checkpoints/last.ckpt and only exports)"
            )
