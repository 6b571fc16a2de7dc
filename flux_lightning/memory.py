"""Memory features of the quickstart: interval gradient checkpointing and diffusers group offload.

The remaining memory switches live where they act: VAE tiling and text-encoder quantization in
:mod:`.components` (loading), model CPU offload in the validation callback, quantization of the
transformer in :mod:`.quantization`, attention backends in :func:`.components.set_attention_backend`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .components import GROUP_OFFLOAD_TYPES, ModelConfig

log = logging.getLogger(__name__)


def checkpointed_blocks(transformer: torch.nn.Module, interval: int) -> list[int]:
    """Global indices (double blocks, then single blocks) of the blocks that recompute in backward:
    every ``interval``-th block starting with the first."""
    total = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    return [i for i in range(total) if i % interval == 0]


def enable_gradient_checkpointing(transformer: torch.nn.Module, interval: int = 1) -> None:
    """Turn on diffusers' gradient checkpointing for every ``interval``-th transformer block.

    Diffusers calls ``transformer._gradient_checkpointing_func(block, *inputs)`` for each block when
    checkpointing is on; the function installed here checkpoints the selected blocks (PyTorch's
    non-reentrant ``checkpoint``, as diffusers does) and runs the others plainly, so their
    activations stay in memory. ``interval=1`` is diffusers' own behaviour.
    """
    if interval < 1:
        raise ValueError(f"model.gradient_checkpointing_interval={interval} must be >= 1")
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    selected = {id(blocks[i]) for i in checkpointed_blocks(transformer, interval)}

    def every_nth_block(block, *args):
        if id(block) in selected:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=every_nth_block)


def memory_problems(cfg: ModelConfig, *, cuda: bool | None = None) -> list[str]:
    """Invalid or impossible memory settings, one line each (checked before any weights load)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    out = []
    if cfg.gradient_checkpointing_interval < 1:
        out.append(
            f"model.gradient_checkpointing_interval={cfg.gradient_checkpointing_interval} must be >= 1; "
            "use 1 to checkpoint every block"
        )
    if cfg.enable_group_offload and cfg.enable_model_cpu_offload:
        out.append(
            "model.enable_group_offload and model.enable_model_cpu_offload are mutually exclusive; "
            "turn one of them off"
        )
    if cfg.group_offload_type not in GROUP_OFFLOAD_TYPES:
        out.append(
            f"model.group_offload_type={cfg.group_offload_type!r} is unknown; use {' or '.join(GROUP_OFFLOAD_TYPES)}"
        )
    if cfg.group_offload_blocks_per_group < 1:
        out.append(f"model.group_offload_blocks_per_group={cfg.group_offload_blocks_per_group} must be >= 1")
    if cfg.enable_group_offload and not cuda:
        out.append(
            "model.enable_group_offload needs a CUDA GPU to offload from (none is visible); "
            "set model.enable_group_offload=false"
        )
    return out


def apply_group_offload(transformer: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> None:
    """Keep the transformer's blocks on the CPU (or disk) and move each group to ``device`` for its
    forward pass (diffusers group offloading). CUDA streams are used only on CUDA devices."""
    use_stream = cfg.group_offload_use_stream and device.type == "cuda"
    if cfg.group_offload_use_stream and not use_stream:
        log.info("model.group_offload_use_stream needs CUDA; offloading without a stream on %s", device)
    kwargs = dict(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=cfg.group_offload_type,
        use_stream=use_stream,
    )
    if cfg.group_offload_type == "block_level":
        kwargs["num_blocks_per_group"] = cfg.group_offload_blocks_per_group
    if cfg.group_offload_to_disk_path:
        Path(cfg.group_offload_to_disk_path).expanduser().mkdir(parents=True, exist_ok=True)
        kwargs["offload_to_disk_path"] = str(Path(cfg.group_offload_to_disk_path).expanduser())
    transformer.enable_group_offload(**kwargs)
