"""Accelerators: what this machine has, which devices a run uses, and what fits in a GPU's memory.

Used by the CLI (``trainer.devices=auto``, resolved before the trainer is built), by the configure
wizard (:mod:`flux_lightning.wizard.configure`: GPU memory -> quantization and memory settings) and by the
web UI's Hardware page (multi-GPU auto / manual / off). Library core: no Hydra.

Detection never creates a CUDA context by itself when it can help it: the count comes from
``torch.cuda.device_count()`` (NVML, which keeps a later ``fork`` usable) and names and memory from
NVML through ``pynvml`` (package ``nvidia-ml-py``) when it is installed, else from
``torch.cuda.get_device_properties`` (which initialises CUDA in this process: harmless for a
process that starts runs as subprocesses, as the web UI does, or for Lightning's ``ddp``, which
re-executes the script; only ``ddp_fork``/``ddp_notebook`` need a process without CUDA).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

GIB = 1024**3
#: strategies ``trainer.devices=auto`` replaces by its own choice (DDP on several GPUs, none on one);
#: any other strategy (``deepspeed_stage_2``, an FSDP node) is kept and only gets the device count.
AUTO_STRATEGIES = ("auto", "ddp")


@dataclass(frozen=True)
class Accelerator:
    """One visible CUDA device.

    Attributes:
        index: its index as this process sees it (after ``CUDA_VISIBLE_DEVICES``), i.e. ``cuda:<index>``.
        name: the device's name (``NVIDIA H100 80GB HBM3``).
        memory_bytes: total memory in bytes.
    """

    index: int
    name: str
    memory_bytes: int

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


def gpu_count() -> int:
    """Visible CUDA devices, counted without creating a CUDA context when NVML can count them
    (``torch.cuda.device_count``); 0 without CUDA. Honours ``CUDA_VISIBLE_DEVICES`` as torch does."""
    try:
        return int(torch.cuda.device_count())
    except Exception as err:  # noqa: BLE001 - a broken driver means no usable GPU, said once
        log.warning("cannot count CUDA devices (%s); treating this machine as having none", err)
        return 0


def _nvml_properties(count: int) -> list[tuple[str, int]] | None:
    """Name and memory of each visible device from NVML (no CUDA context), or None where ``pynvml``
    is not installed or NVML cannot answer."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        out = []
        for i in range(count):
            # torch maps a visible index to NVML's (CUDA_VISIBLE_DEVICES by index or UUID)
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(i))
            name = pynvml.nvmlDeviceGetName(handle)
            out.append(
                (
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                )
            )
        return out
    except Exception:  # noqa: BLE001 - NVML unusable here: fall back to torch
        return None


def detect_accelerators() -> list[Accelerator]:
    """The visible CUDA devices (index, name, memory); ``[]`` without CUDA."""
    count = gpu_count()
    if count == 0:
        return []
    props = None if torch.cuda.is_initialized() else _nvml_properties(count)
    if props is None:
        props = []
        for i in range(count):
            p = torch.cuda.get_device_properties(i)
            props.append((p.name, int(p.total_memory)))
    return [Accelerator(i, name, memory) for i, (name, memory) in enumerate(props)]


@dataclass(frozen=True)
class DeviceChoice:
    """The devices a run uses and how it is told.

    Attributes:
        devices: ``lightning.Trainer(devices=...)``: a count (the chosen GPUs, renumbered from 0 by
            ``CUDA_VISIBLE_DEVICES`` in ``env``) or 1 on the CPU.
        strategy: ``ddp`` on more than one device, else ``auto`` (a single device, no DDP).
        accelerator: ``gpu`` or ``cpu``.
        env: environment variables the run's process needs (``CUDA_VISIBLE_DEVICES`` for a manual
            choice, ``""`` to hide every GPU when off).
        overrides: the same choice as Hydra overrides of ``python -m flux_lightning``.
    """

    devices: int | list[int] | str
    strategy: str
    accelerator: str
    env: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: ``4 GPUs, strategy ddp`` / ``1 GPU, no DDP`` / ``CPU``."""
        if self.accelerator == "cpu":
            return "CPU"
        n = self.devices if isinstance(self.devices, int) else len(self.devices)
        return f"{n} GPU{'s' if n != 1 else ''}, " + ("strategy ddp" if self.strategy == "ddp" else "no DDP")


def _choice(count: int, env: dict[str, str] | None = None) -> DeviceChoice:
    """``count`` GPUs (0 = the CPU). The overrides say ``trainer.devices=auto`` (what
    ``conf/trainer/ddp.yaml`` says too), which the run resolves itself
    (:func:`resolve_trainer_devices`, among the GPUs ``env`` leaves visible): so a trainer the user
    chose (``trainer=fsdp``, ``trainer=deepspeed``) keeps its strategy, where a ``trainer=ddp``
    override would silently replace it."""
    env = dict(env or {})
    if count == 0:
        return DeviceChoice(1, "auto", "cpu", env, ["trainer.accelerator=cpu", "trainer.devices=auto"])
    return DeviceChoice(count, "ddp" if count > 1 else "auto", "gpu", env, ["trainer.devices=auto"])


def choose_devices(
    mode: Literal["auto", "manual", "off"],
    selected: list[int] | None = None,
    accelerators: list[Accelerator] | None = None,
) -> DeviceChoice:
    """The devices of a run: ``auto`` = every visible GPU (DDP when more than one, the CPU when
    none), ``manual`` = the ``selected`` indices (hidden from the others by ``CUDA_VISIBLE_DEVICES``
    in ``env``; DDP when more than one), ``off`` = the CPU (every GPU hidden).

    ``accelerators`` defaults to :func:`detect_accelerators`. An index in ``selected`` that is not
    detected is a ``ValueError`` naming it.
    """
    if mode not in ("auto", "manual", "off"):
        raise ValueError(f"device mode {mode!r} is unknown; use auto, manual or off")
    if mode == "off":
        return _choice(0, {"CUDA_VISIBLE_DEVICES": ""})
    found = detect_accelerators() if accelerators is None else accelerators
    if mode == "auto":
        return _choice(len(found))
    chosen = list(dict.fromkeys(selected or []))
    if not chosen:
        raise ValueError("manual device choice needs at least one GPU index; e.g. selected=[0]")
    known = {a.index for a in found}
    missing = [i for i in chosen if i not in known]
    if missing:
        have = ", ".join(str(i) for i in sorted(known)) or "none"
        raise ValueError(f"GPU index {', '.join(map(str, missing))} is not detected (visible GPUs: {have})")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids: list = list(chosen)
    if visible and visible.strip():  # our indices are positions in the current visible list
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        ids = [parts[i] if i < len(parts) else i for i in chosen]
    return _choice(len(chosen), {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in ids)})


def resolve_trainer_devices(trainer: Mapping[str, Any], count: int | None = None) -> dict[str, Any]:
    """The trainer keyword arguments ``devices: auto`` stands for, or ``{}`` when ``devices`` is set.

    With ``accelerator`` auto/gpu/cuda: every visible GPU (``count``, default :func:`gpu_count`),
    strategy ``ddp`` when more than one and a single device without DDP (a ``ddp`` strategy, e.g.
    ``trainer=ddp`` on a one-GPU machine, becomes ``auto``); the CPU (1 device) when there is none.
    Other strategies (deepspeed, FSDP) are kept. With ``accelerator=cpu``: one CPU device, no DDP.
    """
    if trainer.get("devices") != "auto":
        return {}
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "cpu":
        out: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
    elif accelerator in ("auto", "gpu", "cuda"):
        n = gpu_count() if count is None else count
        out = {"accelerator": "gpu" if n else "cpu", "devices": max(n, 1)}
    else:
        return {}  # mps, tpu, ...: Lightning's own meaning of auto
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, str) and strategy in AUTO_STRATEGIES:
        out["strategy"] = "ddp" if out["devices"] > 1 else "auto"
    return out


def device_summary_rows(trainer) -> list[tuple[str, object]]:
    """The end-of-run table's ``devices`` and ``strategy`` rows for a built ``lightning.Trainer``:
    ``4 x cuda [0, 1, 2, 3] (NVIDIA H100 80GB HBM3)`` and ``ddp`` / ``single device``."""
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower() or "?"
    ids = list(getattr(trainer, "device_ids", []) or [])
    devices = f"{trainer.num_devices} x {accelerator} {ids}"
    if accelerator == "cuda":
        names = sorted({a.name for a in detect_accelerators() if a.index in ids})
        devices += f" ({', '.join(names)})" if names else ""
    nodes = getattr(trainer, "num_nodes", 1)
    if nodes and nodes > 1:
        devices += f" per node, {nodes} nodes"
    return [("devices", devices), ("strategy", strategy_name(trainer.strategy))]


_STRATEGY_NAMES = {
    "SingleDeviceStrategy": "single device",
    "DDPStrategy": "ddp",
    "FSDPStrategy": "fsdp",
    "DeepSpeedStrategy": "deepspeed",
    "ModelParallelStrategy": "model parallel",
}


def strategy_name(strategy) -> str:
    """A Lightning strategy object's short name (``ddp``, ``single device``, ``ddp (spawn)``...)."""
    name = _STRATEGY_NAMES.get(type(strategy).__name__, type(strategy).__name__)
    start = getattr(strategy, "_start_method", "popen")
    return f"{name} ({start})" if name == "ddp" and start != "popen" else name


# -- what fits ------------------------------------------------------------------------------------
#: GB of GPU memory a rank-16 LoRA on a 12B Flux needs per ``quantization=`` choice (the quickstart's
#: "a bit over" figures; fp8 is int8's size).
QUANTIZATION_NEEDS_GB = {
    "none": 30,
    "int8_quanto": 18,
    "fp8_quanto": 18,
    "int4_quanto": 13,
    "nf4_bnb": 9,
    "int2_quanto": 9,
}


def memory_suggestion(memory_gib: float, flavour: str) -> dict:
    """Quantization and memory settings for a GPU of ``memory_gib`` GiB (0 = no GPU), after the
    quickstart's table (rank-16 LoRA on a 12B Flux: bf16 > 30 GB, int8 > 18, int4 > 13, NF4 > 9).

    Returns ``{"quantization": <conf/quantization option>, "optimizer": <conf/optimizer option or
    None = keep the default>, "resolution": px, "overrides": {dotted config key: value},
    "fits": bool, "note": str}``. The tiny flavour fits anywhere (nothing to change).
    """

    def out(quantization, note, *, optimizer=None, resolution=1024, fits=True, **overrides):
        return {
            "quantization": quantization,
            "optimizer": optimizer,
            "resolution": resolution,
            "overrides": {k.replace("__", "."): v for k, v in overrides.items()},
            "fits": fits,
            "note": note,
        }

    if flavour == "tiny":
        return out("none", "the tiny flavour fits in any memory, CPU included", resolution=64)
    if memory_gib <= 0:
        return out(
            "none",
            "no GPU: a 12B Flux flavour needs a CUDA GPU (10 GB at the very least); only model=tiny trains on a CPU",
            fits=False,
        )
    bf16 = {"model__quantization__base_model_default_dtype": "bf16"}
    if memory_gib >= 40:
        note = "unquantized bf16 base: a bit over 30 GB for a rank-16 LoRA"
        if memory_gib >= 48:
            note += "; on 48 GB+ the quickstart's fastest choice is int8_quanto with compile=true"
        return out("none", note)
    if memory_gib >= 24:
        return out("int8_quanto", "int8 base (optimum-quanto): a bit over 18 GB; quality as bf16", **bf16)
    on_cpu = {**bf16, "model__quantization__quantize_via": "cpu"}
    if memory_gib >= 16:
        return out(
            "int4_quanto",
            "int4 base (optimum-quanto): a bit over 13 GB (needs a GPU with bf16); quantized on the CPU "
            "so start-up does not run out of memory on a 16 GB card",
            **on_cpu,
        )
    nf4 = {**on_cpu, "model__vae_enable_tiling": True, "trainer__gradient_clip_val": 0.01}
    if memory_gib >= 12:
        return out(
            "nf4_bnb",
            "NF4 base (bitsandbytes): a bit over 9 GB; 1024 px needs >= 12 GB; AdamW 8-bit and "
            "max_grad_norm 0.01 keep NF4 stable",
            optimizer="adamw8bit",
            **nf4,
        )
    return out(
        "nf4_bnb",
        "the quickstart's minimum-VRAM recipe (9 GB measured on a 10 GB card): NF4 base, paged 8-bit "
        "Lion, 512 px, max_grad_norm 0.01"
        + ("" if memory_gib >= 10 else f"; {memory_gib:g} GiB is below that minimum: expect out-of-memory errors"),
        optimizer="lion8bit_paged",
        resolution=512,
        fits=memory_gib >= 10,
        **nf4,
    )
