"""Validation of the composed config, before anything loads: every problem reported at once.

One pattern: each config dataclass checks its own fields in ``problems()``
(:class:`~flux_lightning.model_config.ModelConfig`, ``AdapterConfig``, ``DatasetConfig``,
``TimestepConfig``, ``OptimizerConfig``, ``LRSchedulerConfig``, ``TreadConfig``); this module
types the nodes, adds the checks that need two groups at once (:func:`cross_group_problems`), the
plain-dict groups' checks (:mod:`flux_lightning.run_checks`) and, optionally, the sources on disk
or on the hub (:func:`source_problems`), and raises one :class:`~flux_lightning.errors.ConfigError`
(docs/architecture.md, "Validation: one pattern").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .adapters import BASE_MODIFYING_INITS, AdapterConfig, lora_format_problems
from .components import check_source, folder_problems, resolve_source, vae_problem
from .data.backend_file import resolve_dataset
from .data import huggingface
from .data.config import DatasetConfig, backend_field
from .data.references import pairing_problems
from .errors import ConfigError, DataError, ModelSourceError
from .flow import LossConfig, TimestepConfig
from .model_config import ModelConfig
from .optim import LRSchedulerConfig, OptimizerConfig, adapter_dtype
from .rollout import ScheduledSamplingConfig
from .run_checks import callback_interval_problems, nonfinite_problems, trainer_problems
from .tread import TreadConfig, known_num_blocks
from .values import is_int

__all__ = ["ConfigError", "RunConfig", "validate"]


@dataclass
class RunConfig:
    """The typed, validated parts of a run that the library's classes take."""

    model: ModelConfig
    adapter: AdapterConfig
    dataset: DatasetConfig
    timesteps: TimestepConfig
    tread: TreadConfig = field(default_factory=TreadConfig)
    compile: bool = False
    optimizer: OptimizerConfig | None = None
    lr_scheduler: LRSchedulerConfig | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    scheduled_sampling: ScheduledSamplingConfig = field(default_factory=ScheduledSamplingConfig)

    def module_parts(self) -> dict:
        """Keyword arguments of :class:`~flux_lightning.module.FluxLoRAModule` (and subclasses)."""
        return {
            "model": self.model, "adapter": self.adapter, "timesteps": self.timesteps, "tread": self.tread,
            "loss": self.loss, "scheduled_sampling": self.scheduled_sampling,
        }  # fmt: skip

    def data_parts(self) -> dict:
        """Keyword arguments of :class:`~flux_lightning.data.FluxDataModule` (and subclasses)."""
        return {"dataset": self.dataset, "model": self.model}


def _typed(schema, node, group: str, problems: list[str]):
    try:
        values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        problems.append(f"{group}: {msg} (check the spelling against {schema.__name__})")
        return schema()


def group_problems(run: RunConfig) -> list[str]:
    """Each group's own ``problems()``; nothing that depends on the flavour when it is unknown."""
    out = run.model.problems() + run.adapter.problems()
    out += run.dataset.problems() + run.timesteps.problems() + run.tread.problems()
    out += run.loss.problems() + run.scheduled_sampling.problems()
    for node in (run.optimizer, run.lr_scheduler):
        out += node.problems() if node is not None else []
    if not isinstance(run.compile, bool):
        out.append(f"compile={run.compile!r} must be true or false")
    return out


def adapter_combination_problems(adapter: AdapterConfig, model: ModelConfig, callbacks) -> list[str]:
    """The adapter against the other groups: an init that rewrites the base on a quantized base, the
    export's ``lora_format`` against the targeted modules and against DoRA (so the export at the end
    cannot fail), DoRA against leaf-level group offload."""
    out = []
    if model.quantization.quantized and adapter.init in BASE_MODIFYING_INITS:
        out.append(
            f"adapter.init={adapter.init} rewrites the base weights and cannot run on a quantized base; "
            "use quantization=none or adapter.init=default"
        )
    export = (callbacks or {}).get("adapter_export")
    if export is not None:
        out += lora_format_problems(export.get("lora_format", "diffusers"), adapter)
    if adapter.use_dora is True and model.enable_group_offload and model.group_offload_type == "leaf_level":
        out.append(
            "adapter.use_dora=true reads each base weight after the layer's forward, when leaf-level group "
            "offloading has moved it back to the CPU; use model.group_offload_type=block_level or adapter.use_dora=false"
        )
    return out


def cross_group_problems(run: RunConfig, trainer: dict, callbacks: dict) -> list[str]:
    """Settings that are each valid but cannot run together (all checked before any load);
    ``trainer`` and ``callbacks`` are the plain-dict groups. Call only with a known flavour
    (``run.model.flavour_problems()`` empty)."""
    out = []
    spec, model = run.model.spec, run.model
    name = spec.mimics or spec.name
    weighting = run.timesteps.weighting
    if spec.fast_schedule and weighting not in (None, "schnell_fast") and not run.timesteps.force_schedule:
        out.append(
            f"flavour {name} trains with its fast schedule but timesteps.weighting={weighting}; "
            "drop the timesteps override (schnell picks schnell_fast itself) or add "
            "timesteps.force_schedule=true to train with it anyway"
        )
    scheme = run.timesteps.weighting_scheme
    if spec.fast_schedule and scheme != "none" and not run.timesteps.force_schedule:
        out.append(
            f"flavour {name} trains with its fast schedule but timesteps.weighting_scheme={scheme}; "
            "drop it or add timesteps.force_schedule=true to train with it anyway"
        )
    if model.quantization.base_model_default_dtype == "fp32" and run.adapter.weight_dtype == "bf16":
        out.append(
            "optimizer=adamw_bf16 holds the adapter in bf16 but quantization.base_model_default_dtype=fp32; "
            "use optimizer=adamw (or another fp32 optimizer) or base_model_default_dtype=bf16"
        )
    out += pairing_problems(run.dataset, spec.reference_conditioning, name)
    if model.assistant_lora and run.adapter.type != "lora":
        out.append(
            f"the assistant LoRA of flavour {name} stacks under a LoRA, not a {run.adapter.type}; "
            "set model.assistant_lora_path=none or use adapter=lora"
        )
    try:
        blocks = known_num_blocks(model)
    except ValueError:
        blocks = None
    if blocks is not None and not run.tread.problems():  # route indices against the model's blocks
        out += run.tread.problems(total_blocks=blocks)
    out += adapter_combination_problems(run.adapter, model, callbacks)
    out += schedule_length_problems(run.lr_scheduler, trainer.get("max_steps", -1))
    return out


def schedule_length_problems(sched: LRSchedulerConfig | None, max_steps) -> list[str]:
    """A warm-up as long as the run, a decaying schedule without ``trainer.max_steps``."""
    if sched is None or sched.problems():
        return []
    out = []
    if is_int(max_steps) and max_steps > 0 and sched.num_warmup_steps >= max_steps:
        out.append(
            f"lr_scheduler.num_warmup_steps={sched.num_warmup_steps} >= trainer.max_steps={max_steps}: the run "
            "ends during warm-up; lower num_warmup_steps"
        )
    if sched.decays and not (is_int(max_steps) and max_steps > 0):
        out.append(
            f"lr_scheduler={sched.name} decays over trainer.max_steps, which is {max_steps}; set "
            "trainer.max_steps=N or use lr_scheduler=constant"
        )
    return out


def data_folder_problems(dataset: DatasetConfig) -> list[str]:
    out = []
    for b in dataset.image_backends():
        if b.type == "huggingface":
            problem = huggingface.source_problem(b)
            out += [problem] if problem else []
            continue
        field_name = backend_field(b.id, "instance_data_dir")
        what = "the reference images" if b.conditioning_type == "reference" and b.dataset_type == "conditioning" else "a folder of images"
        out += [
            f"{field_name}: folder '{d}' does not exist; point it at {what}"
            for d in b.folders()
            if not Path(d).expanduser().is_dir()
        ]
    out += [
        f"dataset.eval_data_dir: folder '{d}' does not exist; point it at a folder of images"
        for d in dataset.eval_folders()
        if not Path(d).expanduser().is_dir()
    ]
    return out


_MOVED_EVAL_KEYS = ("eval_fraction", "eval_min_images", "eval_data_dir")


def eval_split_problems(callbacks: dict, dataset: DatasetConfig) -> list[str]:
    """The ``eval_loss`` callback needs an eval split (``dataset.eval_fraction`` or
    ``dataset.eval_data_dir``); the split's settings are ``dataset.*``, no longer the callback's."""
    eval_loss = callbacks.get("eval_loss")
    if not isinstance(eval_loss, dict):
        return []
    out = [
        f"callbacks.eval_loss.{key} is now dataset.{key}; move it there"
        for key in _MOVED_EVAL_KEYS if key in eval_loss
    ]
    if dataset.eval_fraction == 0 and not dataset.eval_folders():
        out.append(
            "callbacks.eval_loss needs dataset.eval_fraction > 0 or dataset.eval_data_dir=<folder> "
            "(or set callbacks.eval_loss=null)"
        )
    return out


def source_problems(run: RunConfig) -> list[str]:
    """Data folders that do not exist; model sources (local folder or hub ``model_index.json``)
    that cannot be used; all probed without loading any weights."""
    out = data_folder_problems(run.dataset)
    m = run.model
    try:
        main = resolve_source(m)
        check_source(main, revision=m.revision, gated=m.spec.gated)
        for extra in (m.pretrained_vae_model_name_or_path, m.pretrained_transformer_model_name_or_path):
            if extra:
                check_source(extra, gated=False)
    except ModelSourceError as err:
        out.append(str(err))
    else:  # local folders: every component's weights there (a partial download), a VAE by 8
        skip = tuple(k for k, v in (("vae", m.pretrained_vae_model_name_or_path),
                                    ("transformer", m.pretrained_transformer_model_name_or_path)) if v)
        out += folder_problems(main, skip)
        vae = m.pretrained_vae_model_name_or_path
        if vae and Path(vae).expanduser().is_dir():
            folder = Path(vae).expanduser() / ("vae" if (Path(vae).expanduser() / "vae").is_dir() else "")
            out += [p for p in [vae_problem(folder, "model.pretrained_vae_model_name_or_path")] if p]
    assistant = run.model.assistant_lora
    if assistant and not Path(assistant[0]).expanduser().exists() and assistant[0].startswith(("/", ".", "~")):
        out.append(
            f"model.assistant_lora_path: '{assistant[0]}' does not exist; point it at a LoRA file "
            "or folder, or set it to none"
        )
    return out


def _plain(node) -> dict:
    """``node`` as a plain dict with every value that resolves here resolved; a value whose
    interpolation only resolves inside a Hydra run (``${hydra:...}`` paths) is left as written."""
    if not isinstance(node, DictConfig):
        return node or {}
    out = {}
    for key in node:
        try:
            value = node[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException:
            out[key] = OmegaConf.to_container(node, resolve=False)[key]
    return out


def loop_problems(cfg: DictConfig, trainer: dict, callbacks: dict) -> list[str]:
    """The plain-dict groups that reach Lightning untyped (see :mod:`flux_lightning.run_checks`):
    trainer kwargs, checkpoint/eval intervals, the non-finite guard's limit."""
    out = trainer_problems(trainer, allow_endless_run=bool(cfg.get("allow_endless_run", False)))
    out += callback_interval_problems(callbacks)
    out += nonfinite_problems(cfg.get("nonfinite_max_consecutive", 10))
    return out


def validate(cfg: DictConfig, *, check_sources: bool = True) -> RunConfig:
    """Turn ``cfg`` into typed parts, or raise one :class:`ConfigError` listing every problem.

    Flavour-driven choices are resolved here: the flavour's own sigma schedule when
    ``timesteps.weighting`` is null, the adapter's dtype from the optimizer, reference pairs for
    flavours that train on them. With ``check_sources`` the model source is probed and data folders
    are checked (:func:`source_problems`), all before any weights load.
    """
    problems: list[str] = []
    run = RunConfig(
        model=_typed(ModelConfig, cfg.model, "model", problems),
        adapter=_typed(AdapterConfig, cfg.adapter, "adapter", problems),
        dataset=_typed(DatasetConfig, cfg.dataset, "dataset", problems),
        timesteps=_typed(TimestepConfig, cfg.timesteps, "timesteps", problems),
        tread=_typed(TreadConfig, cfg.get("tread_config"), "tread_config", problems),
        loss=_typed(LossConfig, cfg.get("loss"), "loss", problems),
        scheduled_sampling=_typed(ScheduledSamplingConfig, cfg.get("scheduled_sampling"), "scheduled_sampling", problems),
        compile=cfg.get("compile", False),
        optimizer=_typed(OptimizerConfig, cfg.optimizer, "optimizer", problems) if cfg.get("optimizer") is not None else None,
        lr_scheduler=(
            _typed(LRSchedulerConfig, cfg.lr_scheduler, "lr_scheduler", problems)
            if cfg.get("lr_scheduler") is not None
            else None
        ),
    )
    try:
        run.dataset = resolve_dataset(run.dataset)
    except DataError as err:
        problems.append(str(err))
    if run.adapter.weight_dtype is None:
        run.adapter.weight_dtype = adapter_dtype(run.optimizer.name if run.optimizer is not None else None)
    flavour_known = not run.model.flavour_problems()
    trainer, callbacks = _plain(cfg.get("trainer")), _plain(cfg.get("callbacks"))
    problems += group_problems(run) + loop_problems(cfg, trainer, callbacks)
    problems += eval_split_problems(callbacks, run.dataset)
    if flavour_known:
        problems += cross_group_problems(run, trainer, callbacks)
        run.timesteps = run.timesteps.for_flavour(run.model.spec.fast_schedule)
    if check_sources and not problems:
        problems += source_problems(run)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return run
