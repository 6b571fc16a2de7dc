"""A run's identity: the part of the composed config that changes its weights, kept in the run dir.

Run dirs are named by the experiment (``outputs/runs/<run_name>``) and a re-run resumes the newest
checkpoint there, so a changed command (``adapter.rank=8``, another data folder) would otherwise
continue -- or skip as "already finished" -- a different run. :func:`identity` picks the result-changing
values (model, data, adapter, optimizer, schedule, timesteps, loss, seed, the trainer's math, the
EMA's rule), resolved; not the length of the run (``trainer.max_steps``...), logging, observing
callbacks, memory-only switches or paths of outputs and caches. ``train()`` writes it to
``<run dir>/run_config.yaml`` when a run starts, and before resuming ``latest`` compares: a difference
is refused (exit 2) naming the keys and the three ways on: ``run_name=<new>`` (another dir),
``resume_from_checkpoint=null`` (this dir afresh) or ``resume.allow_changes=[key,...]`` (continue with a
deliberate change; a group name allows its every key; the file then records the new values).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config.validation import GROUPS
from ..errors import ConfigError

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_config.yaml"

# the typed groups are recorded whole (minus EXCLUDED keys)
_GROUPS = tuple(g.name for g in GROUPS)
# keys that never change the weights: where things are written or cached, memory-only switches,
# the run's length, logging and checks
EXCLUDED = {
    "model.cache_dir",
    "model.gradient_checkpointing",
    "model.gradient_checkpointing_interval",
    "model.enable_group_offload",
    "model.group_offload_type",
    "model.group_offload_blocks_per_group",
    "model.group_offload_use_stream",
    "model.group_offload_to_disk_path",
    "model.enable_model_cpu_offload",
    "dataset.cache_dir",
    "dataset.num_workers",
    "dataset.vae_batch_size",
    "dataset.text_embeds.cache_dir",
    "trainer._convert_",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.max_time",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.enable_checkpointing",
    "trainer.profiler",
    "trainer.plugins",
    "trainer.barebones",
    "trainer.detect_anomaly",
}
_EMA_KEYS = ("decay", "update_every", "start_step")  # callbacks.ema: what the EMA file is


@dataclass
class ResumeConfig:
    """``resume``: how a re-run treats the run dir's recorded config (``run_config.yaml``).

    Attributes:
        allow_changes: keys (``optimizer.lr``) or groups (``optimizer``) that may differ from the run
            dir's recorded config when resuming it; any other difference is refused.
    """

    allow_changes: list[str] = field(default_factory=list)


def _value(node, key):
    """``node[key]`` resolved; its raw text when it cannot be resolved here (no Hydra, a missing env)."""
    try:
        return node[key]
    except Exception:
        return str(node._get_node(key)._value())


def _flatten(node, prefix: str, out: dict) -> None:
    if isinstance(node, DictConfig):
        for key in node:
            path = f"{prefix}.{key}"
            if path in EXCLUDED:
                continue
            _flatten(_value(node, key), path, out)
    elif isinstance(node, ListConfig):
        try:
            out[prefix] = OmegaConf.to_container(node, resolve=True)
        except Exception:
            out[prefix] = OmegaConf.to_container(node, resolve=False)
    else:
        out[prefix] = node


def _file_digest(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def identity(cfg: DictConfig) -> dict:
    """The result-changing values of ``cfg`` as ``{dotted key: plain value}`` (see the module doc)."""
    out: dict = {}
    for group in _GROUPS:
        if group in cfg and cfg[group] is not None:
            _flatten(cfg[group], group, out)
    for group in ("module", "data"):  # their own keys only: the rest interpolates the groups above
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            for key in node:
                if key != "_convert_" and not node._get_node(key)._is_interpolation():
                    _flatten(_value(node, key), f"{group}.{key}", out)
    if isinstance(cfg.get("trainer"), DictConfig):
        _flatten(cfg.trainer, "trainer", out)
    ema = OmegaConf.select(cfg, "callbacks.ema", default=None)
    if isinstance(ema, DictConfig) and ema.get("decay") is not None:
        for key in _EMA_KEYS:
            if key in ema:
                out[f"callbacks.ema.{key}"] = _value(ema, key)
    out["seed"] = _value(cfg, "seed") if "seed" in cfg else None
    backend_file = out.get("dataset.backend_file")
    if backend_file:  # the backends are the file's content, not its name
        out["dataset.backend_file_sha256"] = _file_digest(backend_file)
    return {k: _plain(v) for k, v in sorted(out.items())}


def _plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=False)
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def recorded(run_dir) -> dict | None:
    """The identity written in ``run_dir`` (None: none recorded, or unreadable)."""
    import yaml

    path = Path(run_dir) / IDENTITY_FILE
    try:
        found = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return found if isinstance(found, dict) else None


def record(run_dir, ident: dict) -> None:
    """Write ``ident`` to ``<run_dir>/run_config.yaml`` (atomically; rank 0 only)."""
    import yaml

    from ..atomic_files import write_text_atomic

    if any(int(os.environ.get(v, "0") or 0) != 0 for v in ("LOCAL_RANK", "NODE_RANK")):
        return
    header = (
        "# what this run dir's weights were trained with (flux_lightning.run.run_identity); a re-run that\n"
        "# differs here is refused unless resume.allow_changes lists the key\n"
    )
    write_text_atomic(Path(run_dir) / IDENTITY_FILE, header + yaml.safe_dump(ident, sort_keys=True, allow_unicode=True))


def differences(before: dict, now: dict) -> list[str]:
    """Dotted keys whose value differs (present in one only counts)."""
    return sorted(k for k in before.keys() | now.keys() if before.get(k, "<unset>") != now.get(k, "<unset>"))


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allow)


def _show(value) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 48 else "..." + text[-45:]  # a path's end tells folders apart


def check(run_dir, cfg: DictConfig, checkpoint: str) -> None:
    """Before resuming ``checkpoint`` of ``run_dir``: refuse a config that differs from the recorded one
    (other than in ``resume.allow_changes``), then record the config the run continues with.

    Raises:
        ConfigError: one line naming the differing keys and the three ways on.
    """
    now = identity(cfg)
    before = recorded(run_dir)
    if before is None:
        log.warning(
            "run dir %s has no %s (written by an older version): resuming %s without comparing configs",
            run_dir,
            IDENTITY_FILE,
            checkpoint,
        )
        record(run_dir, now)
        return
    allow = [str(a) for a in (OmegaConf.select(cfg, "resume.allow_changes", default=None) or [])]
    changed = differences(before, now)
    refused = [k for k in changed if not _allowed(k, allow)]
    if refused:
        shown = ", ".join(
            f"{k} ({_show(before.get(k, '<unset>'))} -> {_show(now.get(k, '<unset>'))})" for k in refused[:8]
        )
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise ConfigError(
            f"run dir {run_dir} holds a run trained with another config: {shown}{more}; resuming it would "
            "continue (or skip) that run. Give this one its own dir with run_name=<new>, start this dir afresh "
            "with resume_from_checkpoint=null, or continue that run with the change with "
            f"resume.allow_changes=[{','.join(refused[:8])}]"
        )
    if changed:
        log.warning("resuming %s with changed %s (resume.allow_changes)", run_dir, ", ".join(changed))
        record(run_dir, now)
