"""A progress bar that shows the training loss without a host-device sync on every step."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, refreshed every ``refresh_rate`` steps, with ``loss`` in its postfix.

    ``self.log(..., prog_bar=True)`` makes Lightning turn the value into a Python number after
    every step, which waits for the accelerator. :class:`~flux_lightning.FluxLoRAModule` logs
    ``loss/train`` without ``prog_bar`` instead, and this bar reads it only when it redraws, so the
    loop stays asynchronous between refreshes (set ``refresh_rate`` to the logging interval).
    """

    def __init__(self, refresh_rate: int = 10, process_position: int = 0, metric: str = "loss/train"):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)
        self.metric = metric

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            items["loss"] = f"{float(value):.4f}"
        return items
