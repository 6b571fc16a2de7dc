"""Typed validation of the composed Hydra config: every problem reported at once, before any load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .adapters import AdapterConfig, adapter_problems
from .components import (
    DTYPES,
    GUIDANCE_MODES,
    MASKED_ATTENTION_BACKENDS,
    ModelConfig,
    ModelSourceError,
    attention_backend_problem,
    check_source,
    resolve_source,
)
from .data.backend_file import resolve_dataset
from .data.config import DatasetConfig
from .errors import DataError
from .data.paired import PairedDatasetConfig
from .flavours import FLAVOURS
from .flow import TimestepConfig
from .memory import memory_problems
from .optim import LRSchedulerConfig, OptimizerConfig, adapter_dtype, optimizer_problems
from .run_checks import (
    callback_interval_problems,
    lr_scheduler_problems,
    nonfinite_problems,
    optimizer_value_problems,
    trainer_problems,
)
from .tread import TreadConfig, known_num_blocks, route_problems
from .errors import ConfigError


@dataclass
class RunConfig:
    """The typed parts of a run that the library's classes take."""

    model: ModelConfig
    adapter: AdapterConfig
    dataset: DatasetConfig
    timesteps: TimestepConfig
    tread: TreadConfig = field(default_factory=TreadConfig)
    compile: bool = False


def _typed(schema, node, group: str, problems: list[str]):
    try:
        values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        problems.append(f"{group}: {msg} (check the spelling against {schema.__name__})")
        return schema()


def model_problems(model: ModelConfig) -> list[str]:
    out = []
    if model.flavour not in FLAVOURS:
        out.append(f"model.flavour={model.flavour!r} is unknown; use one of {sorted(FLAVOURS)}")
        return out
    if model.tiny_like is not None:
        if model.flavour != "tiny":
            out.append(f"model.tiny_like={model.tiny_like} only applies to model.flavour=tiny; remove it")
            return out
        if model.tiny_like not in FLAVOURS or model.tiny_like == "tiny":
            out.append(
                f"model.tiny_like={model.tiny_like!r} is unknown; use one of "
                f"{sorted(set(FLAVOURS) - {'tiny'})}"
            )
            return out
    spec = model.spec
    if model.dtype != "auto" and model.dtype not in DTYPES:
        out.append(f"model.dtype={model.dtype!r} is unknown; use auto, {', '.join(DTYPES)}")
    if model.flux_guidance_mode not in GUIDANCE_MODES:
        out.append(f"model.flux_guidance_mode={model.flux_guidance_mode!r} is unknown; use constant or random-range")
    elif model.flux_guidance_mode == "random-range":
        if not spec.guidance_embeds:
            out.append(
                f"model.flux_guidance_mode=random-range: flavour {spec.mimics or spec.name} has no guidance "
                "embedding; use flux_guidance_mode=constant"
            )
        if model.flux_guidance_min > model.flux_guidance_max:
            out.append(
                f"model.flux_guidance_min={model.flux_guidance_min} > flux_guidance_max={model.flux_guidance_max}; swap them"
            )
    if spec.attention_masked and model.flux_attention_masked_training is False:
        out.append(
            f"model.flux_attention_masked_training=false: flavour {spec.mimics or spec.name} was trained "
            "with the T5 padding mask and needs it; remove the override"
        )
    backend = attention_backend_problem(model.attention_backend)
    if backend:
        out.append(backend)
    elif model.attention_masked and model.attention_backend not in MASKED_ATTENTION_BACKENDS:
        out.append(
            f"model.attention_backend={model.attention_backend} takes no attention mask, which flavour "
            f"{spec.mimics or spec.name} / flux_attention_masked_training needs; use "
            f"{' or '.join(MASKED_ATTENTION_BACKENDS)}"
        )
    out += model.quantization.problems() + memory_problems(model)
    return out


def combination_problems(run: RunConfig, optimizer_name: str | None) -> list[str]:
    """Settings that are each valid but cannot run together (all checked before any load)."""
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
    if (
        model.quantization.base_model_default_dtype == "fp32"
        and (run.adapter.weight_dtype or adapter_dtype(optimizer_name)) == "bf16"
    ):
        out.append(
            "optimizer=adamw_bf16 holds the adapter in bf16 but quantization.base_model_default_dtype=fp32; "
            "use optimizer=adamw (or another fp32 optimizer) or base_model_default_dtype=bf16"
        )
    if run.dataset.conditioning_data_dir is not None and not spec.reference_conditioning:
        out.append(
            f"dataset.conditioning_data_dir gives reference images, which flavour {name} does not use; "
            "use model=kontext or remove dataset.conditioning_data_dir"
        )
    if model.assistant_lora and run.adapter.type != "lora":
        out.append(
            f"the assistant LoRA of flavour {name} stacks under a LoRA, not a {run.adapter.type}; "
            "set model.assistant_lora_path=none or use adapter=lora"
        )
    return out


def data_folder_problems(dataset: DatasetConfig) -> list[str]:
    out = []
    for b in dataset.image_backends():
        field_name = "dataset.instance_data_dir" if dataset.uses_shorthand() else f"dataset.backends[{b.id}].instance_data_dir"
        out += [
            f"{field_name}: folder '{d}' does not exist; point it at a folder of images"
            for d in b.folders()
            if not Path(d).expanduser().is_dir()
        ]
    if isinstance(dataset, PairedDatasetConfig):
        out += [
            f"dataset.conditioning_data_dir: folder '{d}' does not exist; point it at the reference images"
            for d in dataset.conditioning_folders()
            if not Path(d).expanduser().is_dir()
        ]
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


def loop_problems(cfg: DictConfig) -> list[str]:
    """Trainer kwargs, optimizer and LR schedule values, checkpoint/eval intervals, the non-finite
    guard (see :mod:`flux_lightning.run_checks`): what reaches Lightning and torch untyped."""
    out = []
    trainer = _plain(cfg.get("trainer"))
    out += trainer_problems(trainer, allow_endless_run=bool(cfg.get("allow_endless_run", False)))
    if cfg.get("optimizer") is not None:
        out += optimizer_value_problems(_typed(OptimizerConfig, cfg.optimizer, "optimizer", out))
    if cfg.get("lr_scheduler") is not None:
        sched = _typed(LRSchedulerConfig, cfg.lr_scheduler, "lr_scheduler", out)
        out += lr_scheduler_problems(sched, trainer.get("max_steps", -1))
    out += callback_interval_problems(_plain(cfg.get("callbacks")))
    out += nonfinite_problems(cfg.get("nonfinite_max_consecutive", 10))
    return out


def validate(cfg: DictConfig, *, check_sources: bool = True) -> RunConfig:
    """Turn ``cfg`` into typed parts, or raise one :class:`ConfigError` listing every problem.

    With ``check_sources`` the model source is probed (local folder or hub ``model_index.json``)
    and data folders are checked, all before any weights load.
    """
    problems: list[str] = []
    run = RunConfig(
        model=_typed(ModelConfig, cfg.model, "model", problems),
        adapter=_typed(AdapterConfig, cfg.adapter, "adapter", problems),
        dataset=_typed(DatasetConfig, cfg.dataset, "dataset", problems),
        timesteps=_typed(TimestepConfig, cfg.timesteps, "timesteps", problems),
        tread=_typed(TreadConfig, cfg.get("tread_config"), "tread_config", problems),
        compile=cfg.get("compile", False),
    )
    try:
        run.dataset = resolve_dataset(run.dataset)
    except DataError as err:
        problems.append(str(err))
    optimizer_name = cfg.optimizer.get("name") if cfg.get("optimizer") is not None else None
    problems += model_problems(run.model)
    flavour_known = run.model.flavour in FLAVOURS and not any("model.tiny_like" in p for p in problems)
    if flavour_known and run.model.spec.reference_conditioning:  # trains on (target, reference) pairs
        run.dataset = PairedDatasetConfig.from_dataset(run.dataset)
    problems += adapter_problems(run.adapter, quantized=run.model.quantization.quantized)
    export = (cfg.get("callbacks") or {}).get("lora_export")  # the export format must suit the targets
    if export is not None:
        from .export import lora_format_problems

        problems += lora_format_problems(export.get("lora_format", "diffusers"), run.adapter)
    problems += run.dataset.problems()
    if optimizer_name is not None:
        problems += optimizer_problems(optimizer_name)
    try:
        blocks = known_num_blocks(run.model)
    except ValueError:  # unknown flavour / tiny_like: reported by model_problems
        blocks = None
    problems += route_problems(run.tread, blocks)
    if not isinstance(run.compile, bool):
        problems.append(f"compile={run.compile!r} must be true or false")
    problems += loop_problems(cfg)
    if run.timesteps.weighting not in (None, "sigmoid", "uniform", "schnell_fast"):
        problems.append(
            f"timesteps.weighting={run.timesteps.weighting!r} is unknown; use sigmoid, uniform or schnell_fast"
        )
    if flavour_known:
        problems += combination_problems(run, optimizer_name)
        run.timesteps = run.timesteps.for_flavour(run.model.spec.fast_schedule)
    if run.adapter.weight_dtype is None:
        run.adapter.weight_dtype = adapter_dtype(optimizer_name)
    if check_sources and not problems:
        problems += data_folder_problems(run.dataset)
        try:
            source = resolve_source(run.model)
            check_source(source, revision=run.model.revision, gated=run.model.spec.gated)
            for extra in (
                run.model.pretrained_vae_model_name_or_path,
                run.model.pretrained_transformer_model_name_or_path,
            ):
                if extra:
                    check_source(extra, gated=False)
            assistant = run.model.assistant_lora
            if assistant and not Path(assistant[0]).expanduser().exists() and assistant[0].startswith(("/", ".", "~")):
                problems.append(
                    f"model.assistant_lora_path: '{assistant[0]}' does not exist; point it at a LoRA file "
                    "or folder, or set it to none"
                )
        except ModelSourceError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return run
