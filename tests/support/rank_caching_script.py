"""Run by tests/data/test_rank_caching.py: fill a cold cache with N CPU processes (DDP over gloo) through
``lightning.Trainer.fit`` and record which cache entries each rank encoded.

    python tests/support/rank_caching_script.py <cache_dir> <devices> <out_dir>
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from flux_lightning import DatasetConfig, FluxDataModule, ModelConfig
from flux_lightning.data.config import TextEmbedsConfig


class Idle(L.LightningModule):
    """One parameter: the run exists to cache; every rank's setup() has run when it trains."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, i):
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Record(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_start(self, trainer, module):
        dm = trainer.datamodule
        (self.out / f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "encoded": dm.encoded,
                    "samples": [s.latent_key for s in dm.samples()],
                    "train": len(dm.train_dataset.samples),
                }
            )
        )


def main(cache: str, devices: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = int(devices)
    dm = FluxDataModule(
        DatasetConfig(
            resolution=64,
            cache_dir=cache,
            demo_images=8,
            batch_size=1,
            vae_batch_size=2,
            num_workers=1,
            eval_fraction=0.0,
            text_embeds=TextEmbedsConfig(write_batch_size=2),
        ),
        ModelConfig(flavour="tiny", cache_dir=str(Path(cache).parent / "models")),
        prompts=["a validation prompt", "another one"],
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=n,
        strategy="ddp" if n > 1 else "auto",
        max_steps=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record(out_dir)],
    )
    trainer.fit(Idle(), dm)


if __name__ == "__main__":
    main(*sys.argv[1:4])
