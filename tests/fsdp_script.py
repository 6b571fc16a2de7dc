"""Run by tests/test_fsdp.py: train the tiny flavour with 2 CPU processes under FSDP (gloo), wrapped
per Flux block, export the LoRA and save a checkpoint; or resume from one.

    python tests/fsdp_script.py <out_dir> <cache_dir> <max_steps> [<ckpt to resume>]
"""

import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flux_lightning import AdapterConfig, DatasetConfig, FluxDataModule, FluxLoRAModule, ModelConfig
from flux_lightning.callbacks import AdapterExport
from flux_lightning.strategies import flux_block_classes, fsdp


class Report(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_start(self, trainer, module):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        units = [type(m.module).__name__ for m in trainer.strategy.model.modules() if isinstance(m, FSDP)]
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"units": units, "trainable": len(trainable)}))


def main(out: str, cache: str, steps: str, ckpt: str | None = None) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    model = ModelConfig(flavour="tiny", cache_dir=f"{cache}/models")
    data = FluxDataModule(DatasetConfig(resolution=64, batch_size=1, cache_dir=cache, demo_images=8, eval_fraction=0.0), model)
    module = FluxLoRAModule(model, AdapterConfig(rank=4, dropout=0.0), optimizer=partial(torch.optim.AdamW, lr=1e-2), seed=7)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=fsdp(state_dict_type="full"), max_steps=int(steps),
        use_distributed_sampler=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[
            Report(out_dir), AdapterExport(str(out_dir / "lora"), dtype="fp32"),
            ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True, every_n_train_steps=int(steps)),
        ],
    )
    trainer.fit(module, data, ckpt_path=ckpt)


if __name__ == "__main__":
    main(*sys.argv[1:5])
