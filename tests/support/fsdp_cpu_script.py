"""Run by tests/training/test_fsdp.py: the tiny Flux transformer with a LoRA under PyTorch FSDP on CPU
(gloo), wrapped by flux_lightning's per-block policy, trained a few steps on fixed inputs; rank 0
exports the LoRA with every parameter gathered. ``world=1`` trains without FSDP (the reference).

    python tests/support/fsdp_cpu_script.py <rank> <world> <init file> <cache_dir> <out_dir>
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flux_lightning import AdapterConfig, ModelConfig
from flux_lightning.adapters import add_adapter, export_adapter
from flux_lightning.model.components import load_transformer
from flux_lightning.training.strategies import flux_block_classes, gathered


def inputs(transformer, step):
    g = torch.Generator().manual_seed(step)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(2, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(2, 8, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
        timestep=torch.rand(2, generator=g),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.full((2,), 3.5) if cfg.guidance_embeds else None,
    )


def main(rank, world, init, cache, out):
    rank, world, out = int(rank), int(world), Path(out)
    torch.manual_seed(0)
    cfg = AdapterConfig(rank=4, dropout=0.0)
    transformer = load_transformer(ModelConfig(flavour="tiny", cache_dir=cache))
    add_adapter(transformer, cfg, dtype=torch.float32)
    total = sum(p.numel() for p in transformer.parameters())
    model, report = transformer, {}
    if world > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        model = FSDP(
            transformer,
            auto_wrap_policy=ModuleWrapPolicy(flux_block_classes()),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
        report["units"] = [type(m.module).__name__ for m in model.modules() if isinstance(m, FSDP)]
        report["local_numel"] = sum(p.numel() for p in model.parameters())
    report["total_numel"] = total
    trainable = [p for p in model.parameters() if p.requires_grad]
    report["trainable"] = len(trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(3):
        x = inputs(transformer, step)
        half = slice(rank, rank + 1) if world > 1 else slice(0, 2)  # each rank half of the batch
        batch = {k: (v[half] if torch.is_tensor(v) and v.shape[0] == 2 else v) for k, v in x.items()}
        loss = model(**batch, return_dict=False)[0].pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    with gathered(model if world > 1 else None):
        report["gathered_numel"] = sum(p.numel() for p in transformer.parameters())
        if rank == 0:
            export_adapter(transformer, cfg, out, dtype=torch.float32)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
