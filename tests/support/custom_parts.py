"""A user's own LightningModule and DataModule, swapped in from the command line by
tests/e2e/test_entry_point.py (``module._target_=custom_parts.CountingModule``), and a callback."""

import gc

import lightning as L

from flux_lightning import FluxDataModule, FluxLoRAModule
from flux_lightning.run import heap


class CountingModule(FluxLoRAModule):
    """Counts its training steps; ``tag`` is an extra keyword argument given as ``+module.tag=...``."""

    def __init__(self, tag: str = "", **kwargs):
        super().__init__(**kwargs)
        self.tag, self.steps_seen = tag, 0

    def training_step(self, batch, batch_idx):
        self.steps_seen += 1
        return super().training_step(batch, batch_idx)

    def summary_rows(self):
        return [
            *super().summary_rows(),
            ("custom module", f"{type(self.model_cfg).__name__} {self.tag} {self.steps_seen} steps"),
        ]


class CountingData(FluxDataModule):
    """Counts the batches its training loader hands out."""

    def __init__(self, tag: str = "", **kwargs):
        super().__init__(**kwargs)
        self.tag, self.batches = tag, 0

    def train_dataloader(self):
        for batch in super().train_dataloader():
            self.batches += 1
            yield batch

    def summary_rows(self):
        return [
            *super().summary_rows(),
            ("custom data", f"{type(self.cfg).__name__} {self.tag} {self.batches} batches"),
        ]


class CollectorProbe(L.Callback):
    """Prints the cyclic collector's state at ``setup`` and at each training batch's end
    (tests/run/test_heap.py): ``gc <where> <postponed 0/1> <threshold0> <threshold1> <threshold2> <objects frozen>``."""

    def _print(self, where: str) -> None:
        print("gc", where, int(heap.postponed()), *gc.get_threshold(), gc.get_freeze_count(), flush=True)

    def setup(self, trainer, pl_module, stage):
        self._print("setup")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._print(f"batch{batch_idx}")
