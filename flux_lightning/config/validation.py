"""Validation of the composed config, before anything loads: every problem reported at once.

One pattern: each config dataclass checks its own fields in ``problems()``
(:class:`~flux_lightning.model.config.ModelConfig`, ``AdapterConfig``, ``DatasetConfig``,
``TimestepConfig``, ``OptimizerConfig``, ``LRSchedulerConfig``, ``TreadConfig``); this module
types the nodes, adds the checks that need two groups at once (:func:`cross_group_problems`), the
plain-dict groups' checks (:mod:`flux_lightning.config.run_checks`) and, optionally, the sources on disk
or on the hub (:func:`source_problems`), and raises one :class:`~flux_lightning.errors.ConfigError`
(docs/architecture.md, "Validation: one pattern").
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..adapters import BASE_MODIFYING_INITS, AdapterConfig
from ..data import huggingface
from ..data.backend_file import resolve_dataset
from ..data.config import DatasetConfig, backend_field
from ..data.references import pairing_problems
from ..errors import ConfigError, DataError, ModelSourceError, Problem
from ..model.components import check_source, folder_problems, resolve_source, vae_problem
from ..model.config import ModelConfig
from ..model.tread import TreadConfig, known_num_blocks
from ..training.flow import LossConfig, TimestepConfig
from ..training.hooks import ConfigChecked, arguments
from ..training.optim import LRSchedulerConfig, OptimizerConfig, adapter_dtype
from ..training.rollout import ScheduledSamplingConfig
from ..values import is_int
from .run_checks import TARGET_CHECKS, nonfinite_problems, trainer_problems

__all__ = ["GROUPS", "ConfigError", "Group", "RunConfig", "validate"]


@dataclass(frozen=True)
class Group:
    """One typed config group: the node ``name`` (``conf/<name>/``, ``model=krea``), its dataclass,
    and which of the library's classes take it as a keyword argument of the same name."""

    name: str
    schema: type
    module: bool = False  # FluxLoRAModule(name=...) (RunConfig.module_parts)
    data: bool = False  # FluxDataModule(name=...) (RunConfig.data_parts)
    nullable: bool = False  # ``<name>=null`` is allowed (the run config holds None)


#: Every typed group, once: schema.TrainConfig's typed nodes, RunConfig's fields, what validate()
#: types and asks for problems(), and the typed arguments of the module and the datamodule are built
#: from this list (docs/architecture.md, "How to add a group").
GROUPS: tuple[Group, ...] = (
    Group("model", ModelConfig, module=True, data=True),
    Group("adapter", AdapterConfig, module=True),
    Group("dataset", DatasetConfig, data=True),
    Group("timesteps", TimestepConfig, module=True),
    Group("optimizer", OptimizerConfig, nullable=True),
    Group("lr_scheduler", LRSchedulerConfig, nullable=True),
    Group("tread", TreadConfig, module=True),
    Group("loss", LossConfig, module=True),
    Group("scheduled_sampling", ScheduledSamplingConfig, module=True),
)


def _module_parts(self) -> dict:
    """Keyword arguments of :class:`~flux_lightning.training.module.FluxLoRAModule` (and subclasses)."""
    return {g.name: getattr(self, g.name) for g in GROUPS if g.module}


def _data_parts(self) -> dict:
    """Keyword arguments of :class:`~flux_lightning.data.FluxDataModule` (and subclasses)."""
    return {g.name: getattr(self, g.name) for g in GROUPS if g.data}


#: The typed, validated parts of a run that the library's classes take: one field per group of
#: :data:`GROUPS` (None for a nullable group set to null), plus ``compile``.
RunConfig = make_dataclass(
    "RunConfig",
    [
        (g.name, g.schema | None, field(default=None))
        if g.nullable
        else (g.name, g.schema, field(default_factory=g.schema))
        for g in GROUPS
    ]
    + [("compile", bool, field(default=False))],
    namespace={"module_parts": _module_parts, "data_parts": _data_parts, "__module__": __name__},
)


def _typed(schema, node, group: str, problems: list[Problem]):
    try:
        values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        problems.append(Problem(group, f"{group}: {msg} (check the spelling against {schema.__name__})"))
        return schema()


def group_problems(run: RunConfig) -> list[Problem]:
    """Each group's own ``problems()``; nothing that depends on the flavour when it is unknown."""
    out = []
    for g in GROUPS:
        node = getattr(run, g.name)
        out += node.problems() if node is not None else []
    if not isinstance(run.compile, bool):
        out.append(Problem("compile", f"compile={run.compile!r} must be true or false"))
    return out


def adapter_combination_problems(adapter: AdapterConfig, model: ModelConfig) -> list[Problem]:
    """The adapter against the model: an init that rewrites the base on a quantized base, DoRA
    against leaf-level group offload (the export's format is ``AdapterExport.config_problems``')."""
    out = []
    if model.quantization.quantized and adapter.init in BASE_MODIFYING_INITS:
        out.append(
            Problem(
                "adapter.init",
                f"adapter.init={adapter.init} rewrites the base weights and cannot run on a quantized base; "
                "use quantization=none or adapter.init=default",
            )
        )
    if adapter.use_dora is True and model.enable_group_offload and model.group_offload_type == "leaf_level":
        out.append(
            Problem(
                "adapter.use_dora",
                "adapter.use_dora=true reads each base weight after the layer's forward, when leaf-level group "
                "offloading has moved it back to the CPU; use model.group_offload_type=block_level or adapter.use_dora=false",
            )
        )
    return out


def cross_group_problems(run: RunConfig, trainer: dict) -> list[Problem]:
    """Settings that are each valid but cannot run together (all checked before any load);
    ``trainer`` is the plain-dict group. Call only with a known flavour
    (``run.model.flavour_problems()`` empty)."""
    out = []
    spec, model = run.model.spec, run.model
    name = spec.mimics or spec.name
    weighting = run.timesteps.weighting
    if spec.fast_schedule and weighting not in (None, "schnell_fast") and not run.timesteps.force_schedule:
        out.append(
            Problem(
                "timesteps.weighting",
                f"flavour {name} trains with its fast schedule but timesteps.weighting={weighting}; "
                "drop the timesteps override (schnell picks schnell_fast itself) or add "
                "timesteps.force_schedule=true to train with it anyway",
            )
        )
    scheme = run.timesteps.weighting_scheme
    if spec.fast_schedule and scheme != "none" and not run.timesteps.force_schedule:
        out.append(
            Problem(
                "timesteps.weighting_scheme",
                f"flavour {name} trains with its fast schedule but timesteps.weighting_scheme={scheme}; "
                "drop it or add timesteps.force_schedule=true to train with it anyway",
            )
        )
    if model.quantization.base_model_default_dtype == "fp32" and run.adapter.weight_dtype == "bf16":
        out.append(
            Problem(
                "optimizer",
                "optimizer=adamw_bf16 holds the adapter in bf16 but quantization.base_model_default_dtype=fp32; "
                "use optimizer=adamw (or another fp32 optimizer) or base_model_default_dtype=bf16",
            )
        )
    out += pairing_problems(run.dataset, spec.reference_conditioning, name)
    if model.assistant_lora and run.adapter.type != "lora":
        out.append(
            Problem(
                "adapter",
                f"the assistant LoRA of flavour {name} stacks under a LoRA, not a {run.adapter.type}; "
                "set model.assistant_lora_path=none or use adapter=lora",
            )
        )
    try:
        blocks = known_num_blocks(model)
    except ValueError:
        blocks = None
    if blocks is not None and not run.tread.problems():  # route indices against the model's blocks
        out += run.tread.problems(total_blocks=blocks)
    out += adapter_combination_problems(run.adapter, model)
    out += schedule_length_problems(run.lr_scheduler, trainer.get("max_steps", -1))
    return out


def schedule_length_problems(sched: LRSchedulerConfig | None, max_steps) -> list[Problem]:
    """A warm-up as long as the run, a decaying schedule without ``trainer.max_steps``."""
    if sched is None or sched.problems():
        return []
    out = []
    if is_int(max_steps) and max_steps > 0 and sched.num_warmup_steps >= max_steps:
        out.append(
            Problem(
                "lr_scheduler.num_warmup_steps",
                f"lr_scheduler.num_warmup_steps={sched.num_warmup_steps} >= trainer.max_steps={max_steps}: the run "
                "ends during warm-up; lower num_warmup_steps",
            )
        )
    if sched.decays and not (is_int(max_steps) and max_steps > 0):
        out.append(
            Problem(
                "lr_scheduler",
                f"lr_scheduler={sched.name} decays over trainer.max_steps, which is {max_steps}; set "
                "trainer.max_steps=N or use lr_scheduler=constant",
            )
        )
    return out


def data_folder_problems(dataset: DatasetConfig) -> list[Problem]:
    out = []
    for b in dataset.image_backends():
        if b.type == "huggingface":
            problem = huggingface.source_problem(b)
            out += [problem] if problem else []
            continue
        field_name = backend_field(b.id, "instance_data_dir")
        what = (
            "the reference images"
            if b.conditioning_type == "reference" and b.dataset_type == "conditioning"
            else "a folder of images"
        )
        out += [
            Problem(field_name, f"{field_name}: folder '{d}' does not exist; point it at {what}")
            for d in b.folders()
            if not Path(d).expanduser().is_dir()
        ]
    out += [
        Problem(
            "dataset.eval_data_dir",
            f"dataset.eval_data_dir: folder '{d}' does not exist; point it at a folder of images",
        )
        for d in dataset.eval_folders()
        if not Path(d).expanduser().is_dir()
    ]
    return out


def callback_problems(callbacks: dict, run: RunConfig) -> list[Problem]:
    """Each configured callback's own problems, through its ``_target_``: a class with
    ``config_problems`` (:class:`~flux_lightning.training.hooks.ConfigChecked`, all of the library's), or one
    of :data:`~flux_lightning.config.run_checks.TARGET_CHECKS` (Lightning's own callbacks). A target that
    cannot be imported is left to instantiation, which names it."""
    out = []
    for key, node in callbacks.items():
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            continue
        try:
            target = get_class(node["_target_"])
        except Exception:  # noqa: BLE001 - Hydra's instantiate reports a bad _target_
            continue
        field = f"callbacks.{key}"
        if isinstance(target, ConfigChecked):
            out += target.config_problems(arguments(target, node), field=field, run=run)
        for cls, check in TARGET_CHECKS.items():
            if issubclass(target, cls):
                out += check(node, field)
    return out


def source_problems(run: RunConfig) -> list[Problem]:
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
        out.append(Problem("model.pretrained_model_name_or_path", str(err)))
    else:  # local folders: every component's weights there (a partial download), a VAE by 8
        skip = tuple(
            k
            for k, v in (
                ("vae", m.pretrained_vae_model_name_or_path),
                ("transformer", m.pretrained_transformer_model_name_or_path),
            )
            if v
        )
        out += [Problem("model.pretrained_model_name_or_path", p) for p in folder_problems(main, skip)]
        vae = m.pretrained_vae_model_name_or_path
        if vae and Path(vae).expanduser().is_dir():
            folder = Path(vae).expanduser() / ("vae" if (Path(vae).expanduser() / "vae").is_dir() else "")
            problem = vae_problem(folder, "model.pretrained_vae_model_name_or_path")
            out += [Problem("model.pretrained_vae_model_name_or_path", problem)] if problem else []
    assistant = run.model.assistant_lora
    if assistant and not Path(assistant[0]).expanduser().exists() and assistant[0].startswith(("/", ".", "~")):
        out.append(
            Problem(
                "model.assistant_lora_path",
                f"model.assistant_lora_path: '{assistant[0]}' does not exist; point it at a LoRA file "
                "or folder, or set it to none",
            )
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


def loop_problems(cfg: DictConfig, trainer: dict) -> list[Problem]:
    """The plain values that reach Lightning untyped (see :mod:`flux_lightning.config.run_checks`):
    trainer kwargs, the non-finite guard's limit."""
    out = trainer_problems(trainer, allow_endless_run=bool(cfg.get("allow_endless_run", False)))
    out += nonfinite_problems(cfg.get("nonfinite_max_consecutive", 10))
    return out


def validate(cfg: DictConfig, *, check_sources: bool = True) -> RunConfig:
    """Turn ``cfg`` into typed parts, or raise one :class:`ConfigError` listing every problem.

    Flavour-driven choices are resolved here: the flavour's own sigma schedule when
    ``timesteps.weighting`` is null, the adapter's dtype from the optimizer, reference pairs for
    flavours that train on them. With ``check_sources`` the model source is probed and data folders
    are checked (:func:`source_problems`), all before any weights load.
    """
    problems: list[Problem] = []
    typed = {
        g.name: None if g.nullable and cfg.get(g.name) is None else _typed(g.schema, cfg.get(g.name), g.name, problems)
        for g in GROUPS
    }
    run = RunConfig(**typed, compile=cfg.get("compile", False))
    try:
        run.dataset = resolve_dataset(run.dataset)
    except DataError as err:
        problems.append(Problem("dataset.backend_file", str(err)))
    if run.adapter.weight_dtype is None:
        run.adapter.weight_dtype = adapter_dtype(run.optimizer.name if run.optimizer is not None else None)
    flavour_known = not run.model.flavour_problems()
    trainer, callbacks = _plain(cfg.get("trainer")), _plain(cfg.get("callbacks"))
    problems += group_problems(run) + loop_problems(cfg, trainer)
    problems += callback_problems(callbacks, run)
    if flavour_known:
        problems += cross_group_problems(run, trainer)
        run.timesteps = run.timesteps.for_flavour(run.model.spec.fast_schedule)
    if check_sources and not problems:
        problems += source_problems(run)
    if problems:
        raise ConfigError(problems)
    return run
