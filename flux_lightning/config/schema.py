"""The config schema: one typed node per config group, registered once with Hydra's ConfigStore.

The library's dataclasses are the single source of truth for every field and its default:
``conf/train.yaml`` starts its defaults list with ``train_schema`` (:class:`TrainConfig`), so each
group option (``conf/model/krea.yaml``, ``conf/optimizer/prodigy.yaml``, ...) is merged into a typed
node and states only what differs from the dataclass defaults. A misspelt key fails while Hydra
composes (``Key 'rnk' not in 'AdapterConfig'``), and every field can be set on the command line.

Only the Hydra entry point imports this module; the library itself has no Hydra dependency.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any

from ..run.run_identity import ResumeConfig
from .validation import GROUPS

# Wiring between nodes (not defaults of the dataclasses): caches live under paths.cache_dir, the
# data order follows the run's seed, and the eval split (dataset.eval_fraction, 0 in the library)
# is APP_EVAL_FRACTION while the eval_loss callback is on, 0 when callbacks.eval_loss=null.
_MODEL_WIRING = {"cache_dir": "${paths.cache_dir}/models"}
_DATASET_WIRING = {
    "cache_dir": "${paths.cache_dir}",
    "seed": "${seed}",
    "eval_fraction": "${flux_lightning.eval_fraction:${oc.select:callbacks.eval_loss,null}}",
}
APP_EVAL_FRACTION = 0.1


def app_eval_fraction(eval_loss) -> float:
    """``dataset.eval_fraction`` unless set: :data:`APP_EVAL_FRACTION` of the source images are held
    out while the ``eval_loss`` callback (its config node, or None) is on, none when it is off."""
    return APP_EVAL_FRACTION if eval_loss else 0.0


# Wiring between nodes, by group: the defaults of TrainConfig's typed nodes where they differ from
# the dataclass's own (a group not named here starts from its dataclass's defaults).
_WIRING = {"model": _MODEL_WIRING, "dataset": _DATASET_WIRING}

#: the run's plain fields, after the typed groups (config.GROUPS): (name, type, default)
_RUN_FIELDS = [
    ("seed", int, 42),
    ("compile", bool, False),
    ("nonfinite_max_consecutive", int, 10),
    ("allow_endless_run", bool, False),
    ("resume_from_checkpoint", str | None, "latest"),
    ("resume", ResumeConfig, ResumeConfig),  # a class: its instance is the default
    ("run_name", str, "${flux_lightning.run_name:}"),
    ("paths", Any, None),
    ("module", Any, None),
    ("data", Any, None),
    ("trainer", Any, None),
    ("callbacks", Any, None),
    ("logger", Any, None),
]


def _group_field(group):
    wiring = _WIRING.get(group.name, {})
    return group.name, group.schema, field(default_factory=lambda: group.schema(**wiring))


TrainConfig = make_dataclass(
    "TrainConfig",
    [_group_field(g) for g in GROUPS]
    + [
        (name, tp, field(default_factory=default) if isinstance(default, type) else field(default=default))
        for name, tp, default in _RUN_FIELDS
    ],
    namespace={"__module__": __name__},
)
TrainConfig.__doc__ = """The whole run (``python -m flux_lightning``): typed groups plus the ``_target_`` groups
    (``module``, ``data``, ``trainer``, ``callbacks``, ``logger``) and ``paths`` that stay plain dicts.

    Attributes:
        run_name: names the run dir ``outputs/runs/<run_name>``; default: the experiment's name
            (``demo`` for the embedded default), so re-running a command resumes it.
        resume_from_checkpoint: ``latest`` (the run dir's ``checkpoints/last.ckpt`` if any), a
            path, or null to start fresh.
        resume: ``resume.allow_changes=[optimizer.lr]``: keys that may differ from the run dir's
            recorded config (``run_config.yaml``) when resuming ``latest``; other changes are refused.
        compile: regional ``torch.compile`` of the transformer blocks.
        nonfinite_max_consecutive: a step whose loss or gradient is NaN/inf is skipped (weights and
            optimizer state untouched) and counted (``train/skipped_nonfinite``); this many in a row
            stop the run (exit code 3) naming the step and the likely cause. Checked at logging
            intervals, so the stop comes up to ``trainer.log_every_n_steps - 1`` steps later.
        allow_endless_run: permit ``trainer.max_steps=-1`` with ``trainer.max_epochs=-1`` (a run
            that only stops when killed); refused otherwise.
    """


def unknown_keys(cfg) -> list[str]:
    """Top-level keys of a composed config that :class:`TrainConfig` does not have (``+nonsense=1``:
    Hydra adds a new key to the root without complaint)."""
    from dataclasses import fields

    known = {f.name for f in fields(TrainConfig)} | {"hydra"}  # compose(..., return_hydra_config=True) adds it
    return sorted(str(k) for k in cfg if k not in known)


# group -> the schema of its node (for tests and tools that walk the tree)
GROUP_SCHEMAS: dict[str, type] = {g.name: g.schema for g in GROUPS}


def config_dir() -> str:
    """Absolute path of the Hydra config tree: the checkout's ``conf/`` beside the package when
    running from a source tree, else the copy shipped in the wheel (``flux_lightning.conf``)."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    import flux_lightning.conf as packaged

    return str(Path(packaged.__file__).parent)


def register() -> None:
    """Register ``train_schema`` and the ``flux_lightning.*`` resolvers (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from ..run.rundir import default_run_name, wandb_run_id

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("flux_lightning.run_name"):
        OmegaConf.register_new_resolver("flux_lightning.run_name", default_run_name)
    if not OmegaConf.has_resolver("flux_lightning.wandb_id"):
        OmegaConf.register_new_resolver("flux_lightning.wandb_id", wandb_run_id)
    if not OmegaConf.has_resolver("flux_lightning.eval_fraction"):
        OmegaConf.register_new_resolver("flux_lightning.eval_fraction", app_eval_fraction)
