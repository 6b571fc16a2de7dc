"""Memory features of the quickstart: interval gradient checkpointing, group offload of the frozen
transformer, and model CPU offload of the helper models.

The remaining memory switches live where they act: VAE tiling and text-encoder quantization in
:mod:`.components` (loading), quantization of the transformer in :mod:`.quantization`, attention
backends in :func:`.components.set_attention_backend`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig

log = logging.getLogger(__name__)


def checkpointed_blocks(transformer: torch.nn.Module, interval: int) -> list[int]:
    """Global indices (double blocks, then single blocks) of the blocks that recompute in backward:
    every ``interval``-th block starting with the first."""
    total = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    return [i for i in range(total) if i % interval == 0]


def enable_gradient_checkpointing(transformer: torch.nn.Module, interval: int = 1, *, early_stop: bool = True) -> None:
    """Turn on diffusers' gradient checkpointing for every ``interval``-th transformer block.

    Diffusers calls ``transformer._gradient_checkpointing_func(block, *inputs)`` for each block when
    checkpointing is on; the function installed here checkpoints the selected blocks (PyTorch's
    non-reentrant ``checkpoint``, as diffusers does) and runs the others plainly, so their
    activations stay in memory. ``interval=1`` is diffusers' own behaviour.

    ``early_stop=False`` makes the backward pass recompute each block to its end: PyTorch otherwise
    stops the recomputation once it has the tensors it needs, so a group-offload hook that moves the
    block's weights back to the CPU at the end of its forward pass would never run.
    """
    if interval < 1:
        raise ValueError(f"model.gradient_checkpointing_interval={interval} must be >= 1")
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    selected = {id(blocks[i]) for i in checkpointed_blocks(transformer, interval)}

    def every_nth_block(block, *args):
        if id(block) in selected:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, early_stop=early_stop)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=every_nth_block)


# -- group offload -------------------------------------------------------------------------------
def offloadable_layers(transformer: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
    """Per transformer block (``transformer_blocks.<i>`` / ``single_transformer_blocks.<i>``), its
    frozen ``torch.nn.Linear`` layers (peft's ``base_layer`` included), with their full names.

    Only these move under group offload. Autograd keeps a linear layer's weight for the backward pass
    as a view (``weight.t()``) that still points at the onloaded copy, so swapping the parameter's
    storage back to the CPU after the forward pass cannot corrupt the gradient. Norm weights are
    saved as the parameter itself (so they would be read from the CPU in the backward pass) and
    trainable adapter weights must stay where the optimizer steps them: both stay on the device,
    with everything outside the blocks (embedders, output norm and projection, ~64M parameters).
    """
    out = {}
    for list_name in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, list_name)):
            out[f"{list_name}.{i}"] = [
                (f"{list_name}.{i}.{name}", m)
                for name, m in block.named_modules()
                if type(m) is torch.nn.Linear and not any(p.requires_grad for p in m.parameters())
            ]
    return out


@dataclass
class GroupOffload:
    """The frozen weights that group offloading owns (see :func:`apply_group_offload`).

    Attributes:
        onload_device: where a group computes (the training device).
        owned: ``(module, parameter name)`` of every offloaded tensor.
        groups: the diffusers ``ModuleGroup`` objects, in forward order.
    """

    onload_device: torch.device
    owned: list[tuple[torch.nn.Module, str]] = field(default_factory=list)
    groups: list = field(default_factory=list)

    @contextmanager
    def hidden(self) -> Iterator[None]:
        """Inside, the offloaded parameters are detached from their modules, so a whole-model move
        (Lightning's ``model_to_device``, ``.to(device)``, ``.cuda()``) moves everything else (the
        adapter, norms, the modules outside the blocks) and leaves them where the offload put them."""
        taken = [(module, name, module._parameters.pop(name)) for module, name in self.owned]
        try:
            yield
        finally:
            for module, name, param in taken:
                module._parameters[name] = param


def apply_group_offload(transformer: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> GroupOffload:
    """Keep the frozen linear weights of the transformer blocks on the CPU (or on disk) and move each
    group to ``device`` only for its forward pass (diffusers' group-offloading hooks).

    Call it after the adapter is injected and before any device move: from then on the transformer
    never has to fit on ``device`` whole. Groups: one block each (``block_level``) or one linear layer
    each (``leaf_level``). Training recomputes the blocks one at a time in the backward pass
    (gradient checkpointing), and the recomputation onloads each group again through the same hooks.

    Unlike ``ModelMixin.enable_group_offload``, which offloads whole modules, only
    :func:`offloadable_layers` move: the adapter's parameters (and their ``.grad`` and optimizer
    state) stay on ``device``, and a disk copy never holds (and so never restores stale) adapter
    weights.
    """
    from diffusers.hooks.group_offloading import (
        GroupOffloadingConfig,
        GroupOffloadingHook,
        GroupOffloadingType,
        ModuleGroup,
    )
    from diffusers.hooks.hooks import HookRegistry

    disk = None
    if cfg.group_offload_to_disk_path:
        disk = Path(cfg.group_offload_to_disk_path).expanduser()
        disk.mkdir(parents=True, exist_ok=True)
    offload = GroupOffload(onload_device=torch.device(device))
    config = GroupOffloadingConfig(
        onload_device=offload.onload_device,
        offload_device=torch.device("cpu"),
        offload_type=GroupOffloadingType(cfg.group_offload_type),
        non_blocking=False,
        record_stream=False,
        low_cpu_mem_usage=False,
        offload_to_disk_path=None if disk is None else str(disk),
    )
    modules = dict(transformer.named_modules())
    for block_name, layers in offloadable_layers(transformer).items():
        if cfg.group_offload_type == "block_level":
            units = [(block_name, modules[block_name], [m for _, m in layers])] if layers else []
        else:
            units = [(name, m, [m]) for name, m in layers]
        for group_id, leader, members in units:
            params = [p for m in members for p in m.parameters()]
            group = ModuleGroup(
                modules=[],  # explicit tensors: whole modules would carry adapter weights along
                parameters=params,
                offload_device=config.offload_device,
                onload_device=config.onload_device,
                offload_leader=leader,
                onload_leader=leader,
                offload_to_disk_path=config.offload_to_disk_path,
                group_id=group_id,
            )
            # the name diffusers looks for (pipelines take their execution device from it); offloads now
            registry = HookRegistry.check_if_exists_or_initialize(leader)
            registry.register_hook(GroupOffloadingHook(group, config=config), "group_offloading")
            offload.groups.append(group)
            offload.owned += [(m, name) for m in members for name, p in m.named_parameters(recurse=False)]
    return offload


# -- model CPU offload ---------------------------------------------------------------------------
def park(module: torch.nn.Module | None, cfg: ModelConfig | None) -> None:
    """With ``model.enable_model_cpu_offload``, put a helper model (validation VAE, preview decoder,
    CLIP scorer) back on the CPU once its validation round is done; otherwise leave it where it is.

    The helpers go to the accelerator where they are used (each at the start of its round), so
    between rounds the accelerator holds only what trains: the transformer and its adapter.
    """
    if module is not None and cfg is not None and cfg.enable_model_cpu_offload:
        module.to("cpu")
