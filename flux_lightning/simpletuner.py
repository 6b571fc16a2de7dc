"""SimpleTuner settings, unchanged: a ``config.json`` as Hydra overrides of this library's config tree.

:data:`RULES` maps each SimpleTuner key (written with or without the leading ``--``) onto ours: a
config-group choice (``model=krea``, ``quantization=int8_quanto``, ``optimizer=optimi_lion``,
``adapter=lokr``) or a value (``adapter.rank=16``, ``trainer.gradient_clip_val=1.0``,
``callbacks.validation.every_n_steps=250``). :func:`to_overrides` applies the table; every key ends
up mapped, reported as recognised-but-without-effect (with the reason), or listed as unrecognised,
and a value without an equivalent raises :class:`SettingError`, one line per key naming the fix.

The command line (``python -m flux_lightning simpletuner_config=config.json``) is in
:mod:`flux_lightning.simpletuner_cli`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from .flavours import FLAVOURS
from .errors import SettingError


class _Line(ValueError):
    """A rule's error that is already a whole line (rules reading several keys name them themselves)."""


class Translation(NamedTuple):
    """What :func:`to_overrides` made of a SimpleTuner config.

    Attributes:
        overrides: Hydra overrides (``key=value``), config-group choices first.
        unrecognised: keys this library does not know (nothing is dropped silently).
        no_effect: ``{key: reason}`` for recognised keys that change nothing here.
    """

    overrides: list[str]
    unrecognised: list[str]
    no_effect: dict[str, str]


# ----------------------------------------------------------------------------- value converters
_FALSE = {"", "0", "false", "no", "off", "none"}  # how SimpleTuner reads booleans from config.json
_TRUE = {"1", "true", "yes", "on"}


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, str) and v.strip().lower() in _FALSE | _TRUE:
        return v.strip().lower() in _TRUE
    raise ValueError("is not true or false; write true or false")


def _int(v: Any) -> int:
    try:
        f = float(v) if not isinstance(v, bool) else 0.5
    except (TypeError, ValueError):
        f = 0.5
    if not f.is_integer():
        raise ValueError("is not a whole number; write one, e.g. 16")
    return int(f)


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("is not a number; write one, e.g. 1e-4")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError("is not a number; write one, e.g. 1e-4") from None


def _str(v: Any) -> str:
    if isinstance(v, (dict, list)):
        raise ValueError("must be a string; quote it")
    return str(v)


def _int_or_str(v: Any) -> int | str:
    return v if isinstance(v, int) and not isinstance(v, bool) else _str(v)


def _optional(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``null`` / ``"none"`` / ``""`` -> None, anything else -> ``conv(value)``."""

    def convert(v):
        return None if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")) else conv(v)

    return convert


def _name(v: Any) -> str:
    return str(v).strip().lower()


# ----------------------------------------------------------------------------- rule building blocks
class _Out:
    """What the rules produce: override values (with the key that set them), notes and errors."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.values: dict[str, tuple[Any, str]] = {}
        self.no_effect: dict[str, str] = {}
        self.errors: list[str] = []
        self.unknown: list[str] = sorted(k for k in settings if k not in RULES)

    def set(self, path: str, value: Any, key: str) -> None:
        if path in self.values and self.values[path][0] != value:
            other = self.values[path][1]
            self.errors.append(
                f"{other}={self.settings.get(other)!r} and {key}={self.settings.get(key)!r} both set {path} "
                "to different values; keep one of them"
            )
        self.values.setdefault(path, (value, key))

    def given(self, key: str) -> bool:
        return self.settings.get(key) is not None

    def true(self, key: str) -> bool:
        return self.given(key) and self.read(key, _bool)

    def read(self, key: str, conv: Callable[[Any], Any]) -> Any:
        """Another key's value, converted; a bad value is reported under that key."""
        try:
            return conv(self.settings[key])
        except ValueError as err:
            raise _Line(f"{key}={self.settings[key]!r} {err}") from None


Rule = Callable[[str, Any, _Out], None]  # (key, value, out); raises ValueError("<what is wrong>; <fix>")


def value(path: str, conv: Callable[[Any], Any] = _str) -> Rule:
    """The key sets ``path`` to ``conv(value)``."""

    def rule(key, v, out):
        out.set(path, conv(v), key)

    return rule


def choice(path: str, names: dict[str, Any], fix: str | None = None) -> Rule:
    """The key picks ``names[value]`` for ``path`` (a config group or a value); other values fail."""
    fix = fix or f"use one of {', '.join(names)}"

    def rule(key, v, out):
        if _name(v) not in names:
            raise ValueError(f"has no equivalent here; {fix}")
        out.set(path, names[_name(v)], key)

    return rule


def one_of(path: str, *names: str) -> Rule:
    """The key sets ``path`` to its value, one of ``names`` (same spelling here and in SimpleTuner)."""
    return choice(path, {n: n for n in names})


def no_effect(reason: str) -> Rule:
    """Recognised, but changes nothing here (the reason is reported)."""

    def rule(key, v, out):
        out.no_effect[key] = reason

    rule.no_effect = reason
    return rule


def read_by(owner: str) -> Rule:
    """The key is read by ``owner``'s rule, which runs when either key is given."""

    def rule(key, v, out):
        pass

    rule.read_by = owner
    return rule


def unless(condition: Callable[[_Out], bool], reason: str, rule: Rule) -> Rule:
    """``rule``, or a no-effect note when ``condition`` holds (e.g. a LoRA knob with lora_type=lycoris)."""

    def wrapped(key, v, out):
        if condition(out):
            out.no_effect[key] = reason
        else:
            rule(key, v, out)

    return wrapped


def _lycoris(out: _Out) -> bool:
    return _name(out.settings.get("lora_type", "standard")) == "lycoris"


def _validation_off(out: _Out) -> bool:
    return out.true("validation_disable")


def standard_lora(rule: Rule) -> Rule:
    return unless(_lycoris, "lora_type=lycoris takes it from lycoris_config", rule)


def validation(field: str, conv: Callable[[Any], Any]) -> Rule:
    return unless(_validation_off, "validation_disable=true", value(f"callbacks.validation.{field}", conv))


# ----------------------------------------------------------------------------- rules with context
def _flavour(key, v, out):
    """``model_flavour``; without it, the flavour whose hub repo is ``pretrained_model_name_or_path``,
    else SimpleTuner's default (krea)."""
    if v is None:
        source = out.settings.get("pretrained_model_name_or_path")
        v = next((n for n, spec in FLAVOURS.items() if spec.source == source), "krea")
    real = [n for n in FLAVOURS if n != "tiny"]
    if _name(v) not in real:
        raise ValueError(f"has no equivalent here; use one of {', '.join(real)}")
    out.set("model", _name(v), key)


_flavour.reads = ("model_family", "pretrained_model_name_or_path")


def _timesteps(key, v, out):
    """``flux_fast_schedule`` and the ``flow_*`` knobs; schnell gets its fast schedule unless
    ``flux_fast_schedule`` says otherwise (the quickstart: "no extra flags needed")."""
    fast = _bool(v) if v is not None else _name(out.settings.get("model_flavour")) == "schnell"
    flow = ("flow_schedule_shift", "flow_schedule_auto_shift", "flow_sigmoid_scale", "flow_use_uniform_schedule")
    if fast:
        out.set("timesteps", "schnell_fast", key if v is not None else "model_flavour")
        for k in flow:
            if out.given(k):
                out.no_effect[k] = "the fast schedule (flux_fast_schedule, schnell) draws fixed sigmas, unshifted"
        return
    if out.true("flow_schedule_auto_shift"):
        out.set("timesteps", "auto_shift", "flow_schedule_auto_shift")
    if out.true("flow_use_uniform_schedule"):
        out.set("timesteps.weighting", "uniform", "flow_use_uniform_schedule")
    if out.given("flow_schedule_shift"):
        out.set("timesteps.flow_schedule_shift", out.read("flow_schedule_shift", _float), "flow_schedule_shift")
    if out.given("flow_sigmoid_scale"):
        out.set("timesteps.sigmoid_scale", out.read("flow_sigmoid_scale", _float), "flow_sigmoid_scale")


_timesteps.reads = ("model_flavour",)

QUANTIZATION = {
    "no_change": "none", "bf16": "none", "fp32": "none",
    "int8-quanto": "int8_quanto", "int4-quanto": "int4_quanto", "int2-quanto": "int2_quanto",
    "fp8-quanto": "fp8_quanto", "nf4-bnb": "nf4_bnb",
}  # fmt: skip
TEXT_ENCODER_QUANTIZATION = {k: "no_change" if v == "none" else v for k, v in QUANTIZATION.items() if v != "nf4_bnb"}


def _text_encoders(key, v, out):
    """``text_encoder_1_precision`` and ``_2_`` -> the one ``model.quantization.text_encoder_precision``."""
    given = {k: _name(out.settings[k]) for k in ("text_encoder_1_precision", "text_encoder_2_precision") if out.given(k)}
    for k, name in given.items():
        if name not in TEXT_ENCODER_QUANTIZATION:
            raise _Line(f"{k}={out.settings[k]!r} has no equivalent here; use one of {', '.join(TEXT_ENCODER_QUANTIZATION)}")
    names = {TEXT_ENCODER_QUANTIZATION[n] for n in given.values()}
    if len(names) > 1:
        raise _Line(
            "text_encoder_1_precision and text_encoder_2_precision differ; this trainer quantizes both encoders "
            "alike (model.quantization.text_encoder_precision): give them the same value"
        )
    out.set("model.quantization.text_encoder_precision", names.pop(), next(iter(given)))


_MIXED_PRECISION = {"bf16": ("bf16", "bf16-mixed"), "fp16": ("fp16", "16-mixed"), "no": ("fp32", "32-true")}


def _mixed_precision(key, v, out):
    """Weights and compute dtype: ``model.dtype`` + Lightning's ``trainer.precision``."""
    if _name(v) not in _MIXED_PRECISION:
        raise ValueError("has no equivalent here; use bf16 (recommended), fp16 or no")
    dtype, precision = _MIXED_PRECISION[_name(v)]
    out.set("model.dtype", dtype, key)
    out.set("trainer.precision", precision, key)


OPTIMIZERS = {
    "adamw_bf16": "adamw_bf16", "torch-adamw": "adamw", "adamw": "adamw",
    "optimi-lion": "optimi_lion", "optimi-stableadamw": "optimi_stableadamw",
    "bnb-adamw8bit": "adamw8bit", "bnb-lion8bit-paged": "lion8bit_paged", "prodigy": "prodigy",
}  # fmt: skip
LR_SCHEDULERS = {
    **{n: n for n in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")},
    "cosine_with_warmup": "cosine",  # SimpleTuner's alias
}


def _lr_scheduler(key, v, out):
    """``lr_scheduler`` with ``lr_warmup_steps``, ``lr_num_cycles``, ``lr_power``; as in SimpleTuner,
    ``constant`` with warmup steps is ``constant_with_warmup``."""
    warmup = out.read("lr_warmup_steps", _int) if out.given("lr_warmup_steps") else None
    name = None if v is None else _name(v)
    if name is not None and name not in LR_SCHEDULERS:
        raise ValueError(f"has no equivalent here; use one of {', '.join(LR_SCHEDULERS)}")
    if name in (None, "constant") and warmup:
        name = "constant_with_warmup"
    if name is not None:
        name = LR_SCHEDULERS[name]
        out.set("lr_scheduler", name, key if v is not None else "lr_warmup_steps")
    if warmup is not None:
        if name is None:
            out.no_effect["lr_warmup_steps"] = "0 warmup steps with the default constant schedule"
        else:
            out.set("lr_scheduler.num_warmup_steps", warmup, "lr_warmup_steps")
    for st_key, field, scheduler, conv in (
        ("lr_num_cycles", "num_cycles", "cosine_with_restarts", _int),
        ("lr_power", "power", "polynomial", _float),
    ):
        if out.given(st_key):
            if name == scheduler:
                out.set(f"lr_scheduler.{field}", out.read(st_key, conv), st_key)
            else:
                out.no_effect[st_key] = f"only used by lr_scheduler={scheduler}"


def _betas(key, v, out):
    b1, b2 = out.settings.get("optimizer_beta1"), out.settings.get("optimizer_beta2")
    if b1 is None or b2 is None:
        raise _Line("optimizer_beta1 and optimizer_beta2 go together (SimpleTuner takes both or neither); give both")
    out.set("optimizer.betas", [out.read("optimizer_beta1", _float), out.read("optimizer_beta2", _float)], key)


def _max_grad_norm(key, v, out):
    clip = _optional(_float)(v)
    out.set("trainer.gradient_clip_val", clip or None, key)  # 0 = no clipping
    if clip and not out.given("grad_clip_method"):  # SimpleTuner's default grad_clip_method is 'value'
        out.set("trainer.gradient_clip_algorithm", "value", key)


def _max_steps(key, v, out):
    """``max_train_steps`` / ``num_train_epochs`` (0 = unset); with both, the first limit reached ends it."""
    steps = _int(v) if v is not None else 0
    epochs = out.read("num_train_epochs", _int) if out.given("num_train_epochs") else 0
    if not steps and not epochs:
        raise _Line("max_train_steps and num_train_epochs are both 0 (or missing); set one of them")
    out.set("trainer.max_steps", steps or -1, key if steps else "num_train_epochs")
    if epochs:
        out.set("trainer.max_epochs", epochs, "num_train_epochs")


def _resume(key, v, out):
    name = _name(v)
    if name not in ("latest", "none", ""):
        raise ValueError("names a SimpleTuner checkpoint, which cannot be resumed here; use latest or none")
    out.set("resume_from_checkpoint", "latest" if name == "latest" else None, key)


def _lycoris_config(key, v, out):
    """A LyCORIS config (``load_settings`` reads the file) -> the LoKr adapter's rank, alpha, factors."""
    if not _lycoris(out):
        out.no_effect[key] = "only used with lora_type=lycoris"
        return
    if not isinstance(v, dict):
        raise ValueError("must be a JSON object or a file holding one")
    if _name(v.get("algo", "lokr")) != "lokr":
        raise _Line(f"lycoris_config: algo={v['algo']!r} has no equivalent here; use algo lokr")
    if _float(v.get("multiplier", 1.0)) != 1.0:
        raise _Line(f"lycoris_config: multiplier={v['multiplier']!r} is not supported; use 1.0 (scale at inference)")
    fields = {"factor": ("factor", _int), "linear_dim": ("rank", _int), "linear_alpha": ("alpha", _float),
              "full_matrix": ("full_matrix", _bool)}  # fmt: skip
    out.unknown += [f"{key}.{k}" for k in v if k not in (*fields, "algo", "multiplier", "apply_preset")]
    for field, (path, conv) in fields.items():
        if field in v:
            out.set(f"adapter.{path}", conv(v[field]), key)
    preset = v.get("apply_preset") or {}
    modules = set(preset.get("target_module", []))
    if modules - {"Attention", "FluxAttention", "FeedForward"}:
        raise _Line(f"lycoris_config: target_module={sorted(modules)} has no equivalent here; use [Attention, FeedForward]")
    if modules:
        out.set("adapter.target", "attention+ff", key)
    ff = (preset.get("module_algo_map") or {}).get("FeedForward", {})
    if "factor" in ff:
        out.set("adapter.ff_factor", _int(ff["factor"]), key)


def _tread(key, v, out):
    try:
        doc = json.loads(v) if isinstance(v, str) else v
    except ValueError:
        raise ValueError('is not valid JSON; write an object {"routes": [...]}') from None
    if not isinstance(doc, dict) or not isinstance(doc.get("routes", []), list):
        raise ValueError('must be an object {"routes": [...]}')
    out.unknown += [f"{key}.{k}" for k in doc if k != "routes"]
    out.set("tread_config.routes", doc.get("routes", []), key)


def _data_backend_config(key, v, out):
    out.set("dataset", "multibackend", key)
    out.set("dataset.backend_file", _str(v), key)


def _resolution(key, v, out):
    if out.given("data_backend_config"):
        out.no_effect[key] = "each backend of data_backend_config has its own resolution"
    else:
        out.set("dataset.resolution", _int(v), key)


def _report_to(key, v, out):
    name = "none" if v is None else _name(v)
    if name not in ("tensorboard", "wandb", "none", "simpletuner", ""):
        raise ValueError("has no equivalent here; use tensorboard or wandb")
    if name in ("tensorboard", "wandb"):
        out.set("logger", name, key)
    elif v is not None:
        out.no_effect[key] = "TensorBoard logs are written locally anyway (logger=csv or logger=wandb to change)"
    for st_key, field in (("tracker_project_name", "project"), ("tracker_run_name", "name")):
        if out.given(st_key):
            if name == "wandb":
                out.set(f"logger.wandb.{field}", out.read(st_key, _str), st_key)
            else:
                out.no_effect[st_key] = "only used with report_to=wandb"


def _true_sets(path: str, value_: Any) -> Rule:
    """A flag that, when true, sets ``path`` to ``value_`` (false changes nothing)."""

    def rule(key, v, out):
        if _bool(v):
            out.set(path, value_, key)

    return rule


def _validation_disable(key, v, out):
    """No validation images, so nothing for the CLIP score either (it would still load CLIP)."""
    if _bool(v):
        out.set("callbacks.validation", None, key)
        out.set("callbacks.clip_score", None, key)


def _only(expected: str, fix: str) -> Rule:
    def rule(key, v, out):
        if _name(v) != expected:
            raise ValueError(f"is not supported; {fix}")

    return rule


_ATTENTION = {"diffusers": "sdpa", "native": "sdpa", "sageattention": "sageattention", "flash-attn": "flash",
              "flash-attn-2": "flash", "flex": "flex", "xformers": "xformers"}  # fmt: skip
_M, _Q = "model.", "model.quantization."

RULES: dict[str, Rule] = {
    # the model
    "model_family": _only("flux", "this trainer trains Flux.1 (model_family flux)"),
    "model_type": _only("lora", "this trainer trains LoRA/LoKr adapters (model_type lora)"),
    "model_flavour": _flavour,
    "pretrained_model_name_or_path": value(_M + "pretrained_model_name_or_path"),
    "pretrained_transformer_model_name_or_path": value(_M + "pretrained_transformer_model_name_or_path", _optional(_str)),
    "pretrained_transformer_subfolder": value(_M + "pretrained_transformer_subfolder"),
    "pretrained_vae_model_name_or_path": value(_M + "pretrained_vae_model_name_or_path", _optional(_str)),
    "revision": value(_M + "revision", _optional(_str)),
    "mixed_precision": _mixed_precision,
    "flux_guidance_value": value(_M + "guidance_value", _float),
    "flux_guidance_mode": one_of(_M + "flux_guidance_mode", "constant", "random-range"),
    "flux_guidance_min": value(_M + "flux_guidance_min", _float),
    "flux_guidance_max": value(_M + "flux_guidance_max", _float),
    "flux_attention_masked_training": value(_M + "flux_attention_masked_training", _bool),
    "assistant_lora_path": value(_M + "assistant_lora_path", _optional(_str)),
    "assistant_lora_weight_name": value(_M + "assistant_lora_weight_name", _optional(_str)),
    "disable_assistant_lora": _true_sets(_M + "assistant_lora_path", "none"),
    # quantization
    "base_model_precision": choice("quantization", QUANTIZATION),
    "base_model_default_dtype": one_of(_Q + "base_model_default_dtype", "bf16", "fp32"),
    "text_encoder_1_precision": _text_encoders,
    "text_encoder_2_precision": read_by("text_encoder_1_precision"),
    "quantize_via": one_of(_Q + "quantize_via", "cpu", "accelerator"),
    # memory and speed
    "attention_mechanism": choice(_M + "attention_backend", _ATTENTION),
    "gradient_checkpointing": value(_M + "gradient_checkpointing", _bool),
    "gradient_checkpointing_interval": value(_M + "gradient_checkpointing_interval", _int),
    "enable_group_offload": value(_M + "enable_group_offload", _bool),
    "group_offload_type": one_of(_M + "group_offload_type", "block_level", "leaf_level"),
    "group_offload_blocks_per_group": value(_M + "group_offload_blocks_per_group", _int),
    "group_offload_use_stream": no_effect(
        "training offloads without streams here (their prefetch runs in forward order, backward runs the other way)"
    ),
    "group_offload_to_disk_path": value(_M + "group_offload_to_disk_path", _optional(_str)),
    "enable_model_cpu_offload": value(_M + "enable_model_cpu_offload", _bool),
    "offload_during_startup": no_effect("always so here: the caching encoders are freed before the transformer loads"),
    "vae_enable_tiling": value(_M + "vae_enable_tiling", _bool),
    "tread_config": _tread,
    # the adapter
    "lora_type": choice("adapter", {"standard": "lora", "lycoris": "lokr"}, "use standard (LoRA) or lycoris (LoKr)"),
    "lycoris_config": _lycoris_config,
    "lora_rank": standard_lora(value("adapter.rank", _int)),
    "lora_alpha": standard_lora(value("adapter.alpha", _optional(_float))),
    "lora_dropout": standard_lora(value("adapter.dropout", _float)),
    "flux_lora_target": standard_lora(
        one_of("adapter.target", "mmdit", "all", "all+ffs", "context", "context+ffs", "tiny", "nano")
    ),
    "lora_init_type": standard_lora(one_of("adapter.init", "default", "gaussian", "loftq", "olora", "pissa")),
    "init_lora": value("adapter.init_lora", _optional(_str)),
    # timesteps
    "flux_fast_schedule": _timesteps,
    "flow_schedule_shift": read_by("flux_fast_schedule"),
    "flow_schedule_auto_shift": read_by("flux_fast_schedule"),
    "flow_sigmoid_scale": read_by("flux_fast_schedule"),
    "flow_use_uniform_schedule": read_by("flux_fast_schedule"),
    # optimisation
    "optimizer": choice("optimizer", OPTIMIZERS),
    "learning_rate": value("optimizer.lr", _float),
    "optimizer_beta1": _betas,
    "optimizer_beta2": read_by("optimizer_beta1"),
    "adam_weight_decay": value("optimizer.weight_decay", _float),
    "lr_scheduler": _lr_scheduler,
    "lr_warmup_steps": read_by("lr_scheduler"),
    "lr_num_cycles": read_by("lr_scheduler"),
    "lr_power": read_by("lr_scheduler"),
    "max_grad_norm": _max_grad_norm,
    "grad_clip_method": one_of("trainer.gradient_clip_algorithm", "norm", "value"),
    "max_train_steps": _max_steps,
    "num_train_epochs": read_by("max_train_steps"),
    "gradient_accumulation_steps": value("trainer.accumulate_grad_batches", _int),
    "seed": value("seed", _int),
    # data
    "data_backend_config": _data_backend_config,
    "resolution": _resolution,
    "train_batch_size": value("dataset.batch_size", _int),
    "vae_batch_size": value("dataset.vae_batch_size", _int),
    "caption_dropout_probability": value("dataset.caption_dropout_probability", _float),
    "resolution_type": no_effect("set per backend in data_backend_config (dataset.resolution is in pixels)"),
    "minimum_image_size": no_effect("set per backend in data_backend_config"),
    "aspect_bucket_rounding": no_effect("bucket sides are multiples of 64 here"),
    # outputs, checkpoints, logs, hub
    "output_dir": value("hydra.run.dir"),
    "resume_from_checkpoint": _resume,
    "checkpointing_steps": value("callbacks.model_checkpoint.every_n_train_steps", _int),
    "checkpoint_step_interval": value("callbacks.model_checkpoint.every_n_train_steps", _int),
    "checkpoints_total_limit": value("callbacks.model_checkpoint.save_top_k", lambda v: _optional(_int)(v) or -1),  # 0 = all
    "report_to": _report_to,
    "tracker_project_name": read_by("report_to"),
    "tracker_run_name": read_by("report_to"),
    "push_to_hub": value("callbacks.model_card.push_to_hub", _bool),
    "hub_model_id": value("callbacks.model_card.hub_model_id", _optional(_str)),
    "push_checkpoints_to_hub": no_effect("only the final LoRA and its model card are uploaded"),
    # validation
    "validation_disable": _validation_disable,
    "validation_prompt": validation("validation_prompt", _optional(_str)),
    "validation_steps": validation("every_n_steps", _int),
    "validation_step_interval": validation("every_n_steps", _int),
    "validation_resolution": validation("validation_resolution", _int_or_str),
    "validation_guidance": validation("validation_guidance", _optional(_float)),
    "validation_guidance_real": validation("validation_guidance_real", _optional(_float)),
    "validation_num_inference_steps": validation("validation_num_inference_steps", _optional(_int)),
    "validation_seed": validation("validation_seed", _int),
    "validation_negative_prompt": validation("validation_negative_prompt", lambda v: "" if v is None else _str(v)),
    "user_prompt_library": validation("user_prompt_library", _optional(_str)),
    "validation_preview": validation("validation_preview", _bool),
    "validation_preview_steps": validation("validation_preview_steps", _int),
    "disable_benchmark": validation("before_training", lambda v: not _bool(v)),
    "validation_guidance_rescale": no_effect("Flux pipelines have no guidance rescale"),
    "validation_torch_compile": no_effect("validation renders with the training transformer (compile=true compiles it)"),
}

GROUPS = ("model", "quantization", "adapter", "dataset", "timesteps", "optimizer", "lr_scheduler", "logger")


def normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Keys without SimpleTuner's optional leading ``--``; a key given both ways must agree."""
    out: dict[str, Any] = {}
    for raw, v in settings.items():
        key = str(raw).strip().lstrip("-")
        if key in out and out[key] != v:
            raise SettingError(f"{key} is given twice with different values ({out[key]!r}, {v!r}); keep one")
        out[key] = v
    return out


def to_overrides(settings: dict[str, Any]) -> Translation:
    """Hydra overrides equivalent to the SimpleTuner ``settings`` (a parsed ``config.json``).

    A key set to ``null`` counts as not given. A rule runs when its key, a key it reads (``reads``)
    or a key it owns (``read_by``) is given.

    Raises:
        SettingError: one line per value without an equivalent here, each naming the key and the fix.
    """
    settings = normalise(settings)
    out = _Out(settings)
    given = {k for k, v in settings.items() if v is not None}
    needed = given | {RULES[k].read_by for k in given & RULES.keys() if hasattr(RULES[k], "read_by")}
    needed |= {k for k, rule in RULES.items() if given & set(getattr(rule, "reads", ()))}
    for key, rule in RULES.items():
        if key in needed and not hasattr(rule, "read_by"):
            try:
                rule(key, settings.get(key), out)
            except _Line as err:
                out.errors.append(str(err))
            except ValueError as err:
                out.errors.append(f"{key}={settings.get(key)!r} {err}")
    if out.errors:
        raise SettingError("\n".join(out.errors))
    groups = [f"{k}={out.values[k][0]}" for k in GROUPS if k in out.values]
    values = [f"{k}={format_value(v)}" for k, (v, _) in sorted(out.values.items(), key=lambda kv: kv[0].lstrip("+"))]
    overrides = groups + [o for o in values if o.split("=", 1)[0] not in GROUPS]
    return Translation(overrides, out.unknown, out.no_effect)


def format_value(v: Any) -> str:
    """``v`` in Hydra's override grammar; strings are always quoted (prompts hold commas, quotes, ...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in v.items()) + "}"
    s = str(v).replace("${", "\\${")  # a literal "${" is not an interpolation
    # in Hydra's quoted strings \' is a quote, and backslashes before a quote or the end are doubled
    s = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), s)
    return f"'{s}'"
