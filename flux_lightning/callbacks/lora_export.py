"""Write the diffusers-format LoRA file with every checkpoint and at the end of training."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from ..components import DTYPES
from ..config import ConfigError


class LoRAExport(L.Callback):
    """Keeps ``<dirpath>/pytorch_lora_weights.safetensors`` current (rank 0 only).

    Args:
        dirpath: output folder, usually ``<run dir>/lora``.
        with_checkpoints: also export whenever Lightning saves a checkpoint.
        lora_format: ``diffusers`` (default), ``comfyui`` or ``kohya`` key layout.
        dtype: tensor dtype in the file: ``bf16`` (default: half the size, what trainers ship),
            ``fp16`` or ``fp32`` (bit-exact with the training weights, so images from the file
            equal the final validation images).
    """

    def __init__(self, dirpath: str, with_checkpoints: bool = True, lora_format: str = "diffusers", dtype: str = "bf16"):
        from ..lora_formats import LORA_FORMATS

        problems = []
        if lora_format not in LORA_FORMATS:
            problems.append(f"callbacks.lora_export.lora_format={lora_format!r} is unknown; use {', '.join(LORA_FORMATS)}")
        if dtype not in DTYPES:
            problems.append(f"callbacks.lora_export.dtype={dtype!r} is unknown; use {', '.join(DTYPES)}")
        if problems:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
        self.dirpath = Path(dirpath)
        self.with_checkpoints = with_checkpoints
        self.lora_format = lora_format
        self.dtype = DTYPES[dtype]
        self.path: Path | None = None

    def _export(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path = pl_module.export_lora(self.dirpath, dtype=self.dtype, lora_format=self.lora_format)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.with_checkpoints:
            self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)
