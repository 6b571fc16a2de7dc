"""Write the diffusers-format LoRA file with every checkpoint and at the end of training."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class LoRAExport(L.Callback):
    """Keeps ``<dirpath>/pytorch_lora_weights.safetensors`` current (rank 0 only).

    Args:
        dirpath: output folder, usually ``<run dir>/lora``.
        with_checkpoints: also export whenever Lightning saves a checkpoint.
        lora_format: ``diffusers`` (default), ``comfyui`` or ``kohya`` key layout.
    """

    def __init__(self, dirpath: str, with_checkpoints: bool = True, lora_format: str = "diffusers"):
        from ..lora_formats import LORA_FORMATS

        if lora_format not in LORA_FORMATS:
            raise ValueError(f"callbacks.lora_export.lora_format={lora_format!r} is unknown; use one of {LORA_FORMATS}")
        self.dirpath = Path(dirpath)
        self.with_checkpoints = with_checkpoints
        self.lora_format = lora_format
        self.path: Path | None = None

    def _export(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path = pl_module.export_lora(self.dirpath, lora_format=self.lora_format)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.with_checkpoints:
            self._export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module)
