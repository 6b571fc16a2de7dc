"""Sharded strategies for the Flux transformer: FSDP wrapped per block, and gathering sharded
adapter weights where one process must see them whole (validation images, LoRA export).

``trainer=fsdp`` builds :func:`fsdp` (Lightning's ``FSDPStrategy``): each ``FluxTransformerBlock``
and ``FluxSingleTransformerBlock`` is its own FSDP unit, so a forward gathers one block at a time
(the whole 12B base is never resident on one GPU), with ``use_orig_params=True`` so the LoRA
tensors stay separate trainable parameters beside the frozen base. Checkpoints are gathered in full
(``state_dict_type: full``: one ``.ckpt`` file, read by :mod:`flux_lightning.run.resume` like any other)
or sharded (``sharded``: a directory, which resume finds too). ``trainer=deepspeed`` (ZeRO-2/3)
writes directories as well; DeepSpeed is optional and needs CUDA.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

FLUX_BLOCKS = (
    "diffusers.models.transformers.transformer_flux.FluxTransformerBlock",
    "diffusers.models.transformers.transformer_flux.FluxSingleTransformerBlock",
)


def flux_block_classes() -> set[type]:
    """The classes FSDP wraps one by one: the double-stream and single-stream Flux blocks, and the
    transformer itself (its embedders and output layers: one more unit, which also makes
    ``module.transformer`` callable on its own, as the validation pipeline calls it)."""
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformer2DModel,
        FluxTransformerBlock,
    )

    return {FluxTransformerBlock, FluxSingleTransformerBlock, FluxTransformer2DModel}


def fsdp(activation_checkpointing: bool = False, **kwargs):
    """Lightning's ``FSDPStrategy`` with the Flux blocks as wrap units (``auto_wrap_policy``) and
    ``use_orig_params=True`` (LoRA parameters trainable beside the frozen, sharded base);
    ``activation_checkpointing``: FSDP's own per-block checkpointing (leave it off while
    ``model.gradient_checkpointing`` is on, which already checkpoints every block). ``kwargs`` go to
    ``FSDPStrategy`` (``sharding_strategy``, ``state_dict_type``, ``cpu_offload``, ...)."""
    from lightning.pytorch.strategies import FSDPStrategy

    blocks = flux_block_classes()
    kwargs.setdefault("use_orig_params", True)
    return FSDPStrategy(
        auto_wrap_policy=blocks, activation_checkpointing_policy=blocks if activation_checkpointing else None, **kwargs
    )


def deepspeed_missing(strategy) -> str | None:
    """The one-line problem of a DeepSpeed strategy without the package installed, else None."""
    from collections.abc import Mapping

    if isinstance(strategy, Mapping):
        name = str(strategy.get("_target_", ""))
    else:
        name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if "deepspeed" not in name.lower() or importlib.util.find_spec("deepspeed") is not None:
        return None
    return (
        f"trainer.strategy={name}: DeepSpeed is not installed; pip install deepspeed (Linux with CUDA), "
        "or use trainer=fsdp (PyTorch's own sharding) or trainer=ddp"
    )


def _fsdp_root(trainer):
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__ != "FSDPStrategy" or trainer.world_size <= 1:
        return None
    return strategy.model


@contextmanager
def gathered(root) -> Iterator[None]:
    """Every parameter of the FSDP module ``root`` whole on every rank inside the block (no write-back);
    ``root=None``: nothing to gather. A collective: every rank enters it."""
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(root, writeback=False, recurse=True):
        yield


@contextmanager
def full_parameters(trainer, module=None) -> Iterator[None]:
    """Every parameter whole on every rank inside the block (FSDP: ``summon_full_params``, no
    write-back; DeepSpeed ZeRO-3: ``GatheredParameters`` of ``module``'s trainable parameters);
    nothing to do for other strategies. Every rank must enter it (it is a collective)."""
    root = _fsdp_root(trainer)
    if root is not None:
        with gathered(root):
            yield
        return
    stage = _zero_stage(trainer)
    if stage == 3 and module is not None:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in module.parameters() if p.requires_grad], modifier_rank=None):
            yield
        return
    with nullcontext():
        yield


def _zero_stage(trainer) -> int | None:
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__ != "DeepSpeedStrategy":
        return None
    return int(((getattr(strategy, "config", None) or {}).get("zero_optimization") or {}).get("stage", 0))


def is_sharded(trainer) -> bool:
    """Whether parameters are sharded across ranks (FSDP with several ranks, DeepSpeed ZeRO-3): then
    every rank must run the forward passes of validation and gather for an export."""
    return _fsdp_root(trainer) is not None or _zero_stage(trainer) == 3
