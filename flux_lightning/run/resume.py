"""Where a run continues from: the checkpoint to resume (``resume_from_checkpoint``), its step
(read without loading it), and whether the run dir's run already finished."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import ConfigError, Problem

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"  # a finished run's outcome (flux_lightning.run.sweep.write_result)


def checkpoint_step(path) -> int:
    """The ``global_step`` of a Lightning checkpoint, reading only its pickle (tensors are mapped,
    not read): a cheap check that the file is a complete checkpoint before Lightning loads it.
    A checkpoint directory (FSDP ``state_dict_type: sharded``, DeepSpeed) is read from its
    metadata file (:func:`_step_file`).

    Raises:
        ValueError: the file is empty, truncated, corrupt or not a Lightning checkpoint (the reason).
    """
    path = Path(path)
    if path.is_dir():
        path = _step_file(path)
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, bad pickle, not a torch file
        raise ValueError(
            f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'unreadable'}"
        ) from None
    if (
        not isinstance(ckpt, dict)
        or "global_step" not in ckpt
        or ("state_dict" not in ckpt and "module" not in ckpt and path.name != "meta.pt")
    ):
        raise ValueError("not a Lightning checkpoint (no global_step/state_dict)")
    return int(ckpt["global_step"])


def _step_file(folder: Path) -> Path:
    """The file of a checkpoint directory that holds its ``global_step``: Lightning's FSDP sharded
    checkpoints keep it in ``meta.pt``; DeepSpeed's in ``<tag>/mp_rank_00_model_states.pt``, the tag
    named by the ``latest`` file (Lightning's tag: ``checkpoint``)."""
    if (folder / "meta.pt").is_file():
        return folder / "meta.pt"
    tag = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else "checkpoint"
    found = folder / tag / "mp_rank_00_model_states.pt"
    if found.is_file():
        return found
    raise ValueError("a folder without meta.pt (FSDP) or <tag>/mp_rank_00_model_states.pt (DeepSpeed)")


def _mtime(path: Path) -> int:
    """When a checkpoint was last written: a directory's newest file."""
    if path.is_dir():
        return max((p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()), default=path.stat().st_mtime_ns)
    return path.stat().st_mtime_ns


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """``latest`` -> the newest readable checkpoint in the run dir's ``checkpoints/`` (normally
    ``last.ckpt``; a ``step*.ckpt`` when the run died between writing it and ``last.ckpt``, or when
    ``last.ckpt`` is missing, empty or truncated: each unreadable newer file is skipped with a
    warning); a path stays a path, and must be readable.

    Raises:
        ConfigError: the path does not exist or is unreadable, or no checkpoint of the run dir is.
    """
    if value in (None, "", "none"):
        return None
    if value == "latest":
        found = [p for p in (Path(output_dir) / "checkpoints").glob("*.ckpt") if p.is_file() or p.is_dir()]
        found.sort(key=lambda p: (_mtime(p), p.name == "last.ckpt"), reverse=True)
        bad = []
        for path in found:
            try:
                checkpoint_step(path)
            except ValueError as err:
                bad.append(f"{path.name} ({err})")
                continue
            if bad:
                log.warning(
                    "resume: skipping unreadable %s; resuming from %s, the newest readable checkpoint",
                    ", ".join(bad),
                    path.name,
                )
            return str(path)
        if bad:
            raise ConfigError(
                Problem(
                    "resume_from_checkpoint",
                    f"resume_from_checkpoint: no checkpoint in {Path(output_dir) / 'checkpoints'} is readable "
                    f"({', '.join(bad)}); delete them to start afresh, or give another run's with resume_from_checkpoint=<path>",
                )
            )
        return None
    if not Path(value).exists():
        raise ConfigError(
            Problem(
                "resume_from_checkpoint",
                f"resume_from_checkpoint: {value} does not exist; give a .ckpt file (or checkpoint folder), latest or null",
            )
        )
    try:
        checkpoint_step(value)
    except ValueError as err:
        raise ConfigError(
            Problem(
                "resume_from_checkpoint",
                f"resume_from_checkpoint: {value} is unreadable ({err}); give another .ckpt file, latest or null",
            )
        ) from None
    return value


def announce_resume(ckpt: str | None, step: int | None) -> None:
    """One line saying where training continues from (or nothing when it starts fresh)."""
    if ckpt is not None:
        print(f"resuming from {ckpt} (step {step}); resume_from_checkpoint=null starts afresh", flush=True)


def finished_result(step: int | None, output_dir: str, max_steps: int | None) -> dict | None:
    """The run dir's ``result.json`` when the run already finished: it exists, and the checkpoint to
    resume from (at ``step``) is at ``trainer.max_steps`` and is the one that result was written for."""
    path = Path(output_dir) / RESULT_FILE
    if step is None or not max_steps or max_steps < 0 or not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if step >= max_steps and result.get("steps") == step else None
