"""Activation bytes per token per block of a FLUX.1 training step, measured at real width on the CPU.

Builds ``FluxLoRAModule`` on ``flux_lightning.model.tiny.ensure_real_width_folder`` (FLUX.1-dev's widths,
1 double + 2 single blocks, bf16 weights), runs one training step (forward + backward, bf16
autocast as ``trainer.precision=bf16-mixed`` does, gradient checkpointing off) and counts, with
``torch.autograd.graph.saved_tensors_hooks``, the bytes autograd keeps for the backward pass
(each storage once), attributed to the block running when it was saved, or to ``outside`` (the
embedders, ``norm_out``, ``proj_out``, the loss). Divided by the joint sequence length (image + text
tokens) x batch, these are the constants of :mod:`flux_lightning.model.forecast`
(``SAVED_BYTES_PER_TOKEN``). Run at two resolutions: constant bytes per token (attention kernels
that keep O(tokens) state) give the same figure at both.

    PYTHONPATH=. python benchmarks/activation_profile.py --px 256 512 --json benchmarks/results/activation_profile.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import machine, save_json


def profile(folder: Path, px: int, rank: int = 16, text_tokens: int = 512, batch: int = 1, target="all") -> dict:
    from flux_lightning import AdapterConfig, FluxLoRAModule, ModelConfig

    cfg = ModelConfig(
        flavour="dev", pretrained_model_name_or_path=str(folder), dtype="bf16", gradient_checkpointing=False
    )
    module = FluxLoRAModule(cfg, AdapterConfig(rank=rank, dropout=0.0, target=target))
    module.configure_model()
    t = module.transformer
    blocks = {id(b): "double" for b in t.transformer_blocks} | {id(b): "single" for b in t.single_transformer_blocks}
    current = ["outside"]
    seen: set[int] = set()
    saved: dict[str, int] = {"double": 0, "single": 0, "outside": 0}

    def enter(m, *_):
        current[0] = blocks[id(m)]

    def leave(m, *_):
        current[0] = "outside"

    for b in [*t.transformer_blocks, *t.single_transformer_blocks]:
        b.register_forward_pre_hook(enter)
        b.register_forward_hook(leave)

    # weights are counted as weights (autograd saves views of them, e.g. ``weight.t()`` for addmm)
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(x):
        key = x.untyped_storage().data_ptr()
        if key not in seen and key not in weights:
            seen.add(key)
            saved[current[0]] += x.untyped_storage().nbytes()
        return x

    side = px // 8
    g = torch.Generator().manual_seed(0)
    data = {
        "latents": torch.randn(batch, 16, side, side, generator=g),
        "prompt_embeds": torch.randn(batch, text_tokens, 4096, generator=g),
        "pooled_prompt_embeds": torch.randn(batch, 768, generator=g),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = module.training_step(data, 0)
    loss.backward()
    tokens = (side // 2) ** 2 + text_tokens
    n_double, n_single = len(t.transformer_blocks), len(t.single_transformer_blocks)
    return {
        "px": px,
        "batch": batch,
        "image_tokens": (side // 2) ** 2,
        "text_tokens": text_tokens,
        "saved_bytes": saved,
        "per_token_per_block": {
            "double": saved["double"] / n_double / tokens / batch,
            "single": saved["single"] / n_single / tokens / batch,
            "outside": saved["outside"] / tokens / batch,
        },
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--px", type=int, nargs="+", default=[256, 512])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flux_lightning_memory_bench")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from flux_lightning.model.tiny import ensure_real_width_folder

    folder = ensure_real_width_folder(args.work / "models")
    runs = []
    for px in args.px:
        r = profile(folder, px)
        print(px, {k: round(v) for k, v in r["per_token_per_block"].items()}, flush=True)
        runs.append(r)
    result = {"machine": machine(), "runs": runs}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
