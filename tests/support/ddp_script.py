"""Run by tests/e2e/test_ddp.py: train the tiny flavour with N CPU processes and save each rank's adapter,
once per gradient-accumulation count (the fits follow each other in the same processes: Lightning starts
the other ranks for the first, which re-run this script and join every fit).

    python tests/support/ddp_script.py <out_dir> <cache_dir> <devices> <batch_size_per_device> <accumulations, e.g. 1,2>
"""

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from flux_lightning import AdapterConfig, DatasetConfig, FluxDataModule, FluxLoRAModule, ModelConfig


class SaveAdapter(L.Callback):
    def __init__(self, out: Path, accumulate: int):
        self.out, self.accumulate = out, accumulate

    def on_train_end(self, trainer, module):
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        name = f"rank{trainer.global_rank}_of_{trainer.world_size}_acc{self.accumulate}.safetensors"
        save_file(state, self.out / name)


def main(out: str, cache: str, devices: str, batch: str, accumulations: str) -> None:
    for accumulate in map(int, accumulations.split(",")):
        fit(Path(out), cache, int(devices), int(batch), accumulate)


def fit(out_dir: Path, cache: str, devices: int, batch: int, accumulate: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    model = ModelConfig(flavour="tiny", cache_dir=f"{cache}/models")
    data = FluxDataModule(
        DatasetConfig(resolution=64, batch_size=batch, cache_dir=cache, demo_images=8, caption_dropout_probability=0.2),
        model,
    )
    module = FluxLoRAModule(
        model, AdapterConfig(rank=4, dropout=0.0), optimizer=partial(torch.optim.AdamW, lr=1e-2), seed=7
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=6,
        accumulate_grad_batches=accumulate,
        use_distributed_sampler=False,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveAdapter(out_dir, accumulate)],
    )
    trainer.fit(module, data)


if __name__ == "__main__":
    main(*sys.argv[1:6])
