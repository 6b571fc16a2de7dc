"""Run by tests/test_ddp.py: train the tiny flavour with N CPU processes and save each rank's adapter.

    python tests/ddp_script.py <out_dir> <cache_dir> <devices> <batch_size_per_device>
"""

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from flux_lightning import AdapterConfig, DatasetConfig, FluxDataModule, FluxLoRAModule, ModelConfig


class SaveAdapter(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, module):
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(state, self.out / f"rank{trainer.global_rank}_of_{trainer.world_size}.safetensors")


def main(out: str, cache: str, devices: str, batch: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    model = ModelConfig(flavour="tiny", cache_dir=f"{cache}/models")
    data = FluxDataModule(
        DatasetConfig(resolution=64, batch_size=int(batch), cache_dir=cache, demo_images=8, caption_dropout_probability=0.2),
        model,
    )
    module = FluxLoRAModule(model, AdapterConfig(rank=4, dropout=0.0), optimizer=partial(torch.optim.AdamW, lr=1e-2), seed=7)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(devices),
        strategy="ddp" if int(devices) > 1 else "auto",
        max_steps=6,
        use_distributed_sampler=False,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveAdapter(out_dir)],
    )
    trainer.fit(module, data)


if __name__ == "__main__":
    main(*sys.argv[1:5])
