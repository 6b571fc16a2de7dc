"""A user's own LightningModule and DataModule, swapped in from the command line by
tests/e2e/test_entry_point.py (``module._target_=custom_parts.CountingModule``)."""

from flux_lightning import FluxDataModule, FluxLoRAModule


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
