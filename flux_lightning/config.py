"""Typed validation of the composed Hydra config: every problem reported at once, before any load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .adapters import INIT_TYPES, AdapterConfig, resolve_targets
from .components import DTYPES, ModelConfig, ModelSourceError, check_source, resolve_source
from .data.backend_file import resolve_dataset
from .data.config import DatasetConfig
from .data.discovery import DataError
from .flavours import FLAVOURS
from .flow import TimestepConfig
from .tread import TreadConfig, known_num_blocks, route_problems


class ConfigError(ValueError):
    """The config cannot run; the message lists every problem, one per line, with its fix."""


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
    if model.dtype != "auto" and model.dtype not in DTYPES:
        out.append(f"model.dtype={model.dtype!r} is unknown; use auto, {', '.join(DTYPES)}")
    return out


def adapter_problems(adapter: AdapterConfig) -> list[str]:
    out = []
    try:
        resolve_targets(adapter.target)
    except ValueError as err:
        out.append(str(err))
    if adapter.rank < 1:
        out.append(f"adapter.rank={adapter.rank} must be >= 1")
    if adapter.init not in INIT_TYPES:
        out.append(f"adapter.init={adapter.init!r} is unknown; use one of {sorted(INIT_TYPES)}")
    if not 0.0 <= adapter.dropout < 1.0:
        out.append(f"adapter.dropout={adapter.dropout} must be within [0, 1)")
    return out


def data_folder_problems(dataset: DatasetConfig) -> list[str]:
    out = []
    for b in dataset.image_backends():
        field = "dataset.instance_data_dir" if dataset.uses_shorthand() else f"dataset.backends[{b.id}].instance_data_dir"
        out += [
            f"{field}: folder '{d}' does not exist; point it at a folder of images"
            for d in b.folders()
            if not Path(d).expanduser().is_dir()
        ]
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
    problems += model_problems(run.model) + adapter_problems(run.adapter) + run.dataset.problems()
    blocks = known_num_blocks(run.model) if run.model.flavour in FLAVOURS else None
    problems += route_problems(run.tread, blocks)
    if not isinstance(run.compile, bool):
        problems.append(f"compile={run.compile!r} must be true or false")
    if run.timesteps.weighting not in ("sigmoid", "uniform", "schnell_fast"):
        problems.append(
            f"timesteps.weighting={run.timesteps.weighting!r} is unknown; use sigmoid, uniform or schnell_fast"
        )
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
        except ModelSourceError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return run
