"""The SimpleTuner key -> override table (:data:`RULES`) and the rules that read several keys.

Each key (without its leading ``--``) maps onto this library's config tree: a config-group choice
(``model=krea``, ``quantization=int8_quanto``, ``optimizer=optimi_lion``, ``adapter=lokr``) or a value
(``adapter.rank=16``, ``trainer.gradient_clip_val=1.0``, ``callbacks.validation.every_n_steps=250``).
Rules are built from :mod:`flux_lightning.simpletuner.rules`; :func:`flux_lightning.simpletuner.overrides.to_overrides`
applies the table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..model.flavours import FLAVOURS
from .rules import (
    LineError,
    Outcome,
    Rule,
    as_bool,
    as_float,
    as_int,
    as_int_or_str,
    as_rank,
    as_str,
    choice,
    name_of,
    no_effect,
    one_of,
    only,
    optional,
    read_by,
    shown,
    true_sets,
    unless,
    value,
)


# ----------------------------------------------------------------------------- conditional rules
def _lycoris(out: Outcome) -> bool:
    return name_of(out.settings.get("lora_type", "standard")) == "lycoris"


def _validation_off(out: Outcome) -> bool:
    return out.true("validation_disable")


def standard_lora(rule: Rule) -> Rule:
    """``rule`` for a LoRA knob; with ``lora_type=lycoris`` a no-effect note instead."""
    return unless(_lycoris, "lora_type=lycoris takes it from lycoris_config", rule)


def validation(field: str, conv: Callable[[Any], Any]) -> Rule:
    """The key sets ``callbacks.validation.<field>``; with ``validation_disable=true`` a no-effect note instead."""
    return unless(_validation_off, "validation_disable=true", value(f"callbacks.validation.{field}", conv))


# ----------------------------------------------------------------------------- rules with context
def _flavour(key, v, out):
    """``model_flavour``; without it, the flavour whose hub repo is ``pretrained_model_name_or_path``,
    else SimpleTuner's default (krea)."""
    if v is None:
        source = out.settings.get("pretrained_model_name_or_path")
        v = next((n for n, spec in FLAVOURS.items() if spec.source == source), "krea")
    real = [n for n in FLAVOURS if n != "tiny"]
    if name_of(v) not in real:
        raise ValueError(f"has no equivalent here; use one of {', '.join(real)}")
    out.set("model", name_of(v), key)


_flavour.reads = ("model_family", "pretrained_model_name_or_path")


def _timesteps(key, v, out):
    """``flux_fast_schedule`` and the ``flow_*`` knobs; schnell gets its fast schedule unless
    ``flux_fast_schedule`` says otherwise (the quickstart: "no extra flags needed")."""
    fast = as_bool(v) if v is not None else name_of(out.settings.get("model_flavour")) == "schnell"
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
        out.set("timesteps.flow_schedule_shift", out.read("flow_schedule_shift", as_float), "flow_schedule_shift")
    if out.given("flow_sigmoid_scale"):
        out.set("timesteps.sigmoid_scale", out.read("flow_sigmoid_scale", as_float), "flow_sigmoid_scale")


_timesteps.reads = ("model_flavour",)

QUANTIZATION = {
    "no_change": "none", "bf16": "none", "fp32": "none",
    "int8-quanto": "int8_quanto", "int4-quanto": "int4_quanto", "int2-quanto": "int2_quanto",
    "fp8-quanto": "fp8_quanto", "nf4-bnb": "nf4_bnb",
}  # fmt: skip
TEXT_ENCODER_QUANTIZATION = {k: "no_change" if v == "none" else v for k, v in QUANTIZATION.items() if v != "nf4_bnb"}


def _text_encoders(key, v, out):
    """``text_encoder_1_precision`` and ``_2_`` -> the one ``model.quantization.text_encoder_precision``."""
    given = {
        k: name_of(out.settings[k]) for k in ("text_encoder_1_precision", "text_encoder_2_precision") if out.given(k)
    }
    for k, name in given.items():
        if name not in TEXT_ENCODER_QUANTIZATION:
            raise LineError(
                f"{k}={shown(out.settings[k])} has no equivalent here; use one of {', '.join(TEXT_ENCODER_QUANTIZATION)}"
            )
    names = {TEXT_ENCODER_QUANTIZATION[n] for n in given.values()}
    if len(names) > 1:
        raise LineError(
            "text_encoder_1_precision and text_encoder_2_precision differ; this trainer quantizes both encoders "
            "alike (model.quantization.text_encoder_precision): give them the same value"
        )
    out.set("model.quantization.text_encoder_precision", names.pop(), next(iter(given)))


_MIXED_PRECISION = {"bf16": ("bf16", "bf16-mixed"), "fp16": ("fp16", "16-mixed"), "no": ("fp32", "32-true")}


def _mixed_precision(key, v, out):
    """Weights and compute dtype: ``model.dtype`` + Lightning's ``trainer.precision``."""
    if name_of(v) not in _MIXED_PRECISION:
        raise ValueError("has no equivalent here; use bf16 (recommended), fp16 or no")
    dtype, precision = _MIXED_PRECISION[name_of(v)]
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
    warmup = out.read("lr_warmup_steps", as_int) if out.given("lr_warmup_steps") else None
    name = None if v is None else name_of(v)
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
        ("lr_num_cycles", "num_cycles", "cosine_with_restarts", as_int),
        ("lr_power", "power", "polynomial", as_float),
    ):
        if out.given(st_key):
            if name == scheduler:
                out.set(f"lr_scheduler.{field}", out.read(st_key, conv), st_key)
            else:
                out.no_effect[st_key] = f"only used by lr_scheduler={scheduler}"


def _betas(key, v, out):
    b1, b2 = out.settings.get("optimizer_beta1"), out.settings.get("optimizer_beta2")
    if b1 is None or b2 is None:
        raise LineError(
            "optimizer_beta1 and optimizer_beta2 go together (SimpleTuner takes both or neither); give both"
        )
    out.set("optimizer.betas", [out.read("optimizer_beta1", as_float), out.read("optimizer_beta2", as_float)], key)


def _max_grad_norm(key, v, out):
    clip = optional(as_float)(v)
    out.set("trainer.gradient_clip_val", clip or None, key)  # 0 = no clipping
    if clip and not out.given("grad_clip_method"):  # SimpleTuner's default grad_clip_method is 'value'
        out.set("trainer.gradient_clip_algorithm", "value", key)


def _max_steps(key, v, out):
    """``max_train_steps`` / ``num_train_epochs`` (0 = unset); with both, the first limit reached ends it."""
    steps = as_int(v) if v is not None else 0
    epochs = out.read("num_train_epochs", as_int) if out.given("num_train_epochs") else 0
    if not steps and not epochs:
        raise LineError("max_train_steps and num_train_epochs are both 0 (or missing); set one of them")
    out.set("trainer.max_steps", steps or -1, key if steps else "num_train_epochs")
    if epochs:
        out.set("trainer.max_epochs", epochs, "num_train_epochs")


def _resume(key, v, out):
    name = name_of(v)
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
    if name_of(v.get("algo", "lokr")) != "lokr":
        raise LineError(f"lycoris_config: algo={shown(v['algo'])} has no equivalent here; use algo lokr")
    try:
        multiplier = as_float(v.get("multiplier", 1.0))
    except ValueError as err:
        raise LineError(f"lycoris_config: multiplier={shown(v['multiplier'])} {err}") from None
    if multiplier != 1.0:
        raise LineError(
            f"lycoris_config: multiplier={shown(v['multiplier'])} is not supported; use 1.0 (scale at inference)"
        )
    fields = {"factor": ("factor", as_int), "linear_dim": ("rank", as_rank), "linear_alpha": ("alpha", as_float),
              "full_matrix": ("full_matrix", as_bool)}  # fmt: skip
    out.unknown += [f"{key}.{k}" for k in v if k not in (*fields, "algo", "multiplier", "apply_preset")]
    for field, (path, conv) in fields.items():
        if field in v:
            try:
                out.set(f"adapter.{path}", conv(v[field]), key)
            except ValueError as err:
                raise LineError(f"lycoris_config: {field}={shown(v[field])} {err}") from None
    preset = v.get("apply_preset") or {}
    if not isinstance(preset, dict):
        raise LineError(
            f"lycoris_config: apply_preset={shown(preset)} must be an object, e.g. "
            '{"target_module": ["Attention", "FeedForward"], "module_algo_map": {"FeedForward": {"factor": 8}}}'
        )
    targets = preset.get("target_module", [])
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise LineError(
            f"lycoris_config: apply_preset.target_module={shown(targets)} must be a list of names; use [Attention, FeedForward]"
        )
    modules = set(targets)
    if modules - {"Attention", "FluxAttention", "FeedForward"}:
        raise LineError(
            f"lycoris_config: target_module={sorted(modules)} has no equivalent here; use [Attention, FeedForward]"
        )
    if modules:
        out.set("adapter.target", "attention+ff", key)
    algo_map = preset.get("module_algo_map") or {}
    if not isinstance(algo_map, dict) or not all(isinstance(m, dict) for m in algo_map.values()):
        raise LineError(
            f"lycoris_config: apply_preset.module_algo_map={shown(algo_map)} must map module names to objects, "
            'e.g. {"FeedForward": {"factor": 8}}'
        )
    ff = algo_map.get("FeedForward", {})
    if "factor" in ff:
        try:
            out.set("adapter.ff_factor", as_int(ff["factor"]), key)
        except ValueError as err:
            raise LineError(f"lycoris_config: module_algo_map.FeedForward.factor={shown(ff['factor'])} {err}") from None


def _tread(key, v, out):
    try:
        doc = json.loads(v) if isinstance(v, str) else v
    except (ValueError, RecursionError):
        raise ValueError('is not valid JSON; write an object {"routes": [...]}') from None
    if not isinstance(doc, dict) or not isinstance(doc.get("routes", []), list):
        raise ValueError('must be an object {"routes": [...]}')
    out.unknown += [f"{key}.{k}" for k in doc if k != "routes"]
    out.set("tread.routes", doc.get("routes", []), key)


def _data_backend_config(key, v, out):
    out.set("dataset", "multibackend", key)
    out.set("dataset.backend_file", as_str(v), key)


def _resolution(key, v, out):
    if out.given("data_backend_config"):
        out.no_effect[key] = "each backend of data_backend_config has its own resolution"
    else:
        out.set("dataset.resolution", as_int(v), key)


def _report_to(key, v, out):
    name = "none" if v is None else name_of(v)
    if name not in ("tensorboard", "wandb", "none", "simpletuner", ""):
        raise ValueError("has no equivalent here; use tensorboard or wandb")
    if name in ("tensorboard", "wandb"):
        out.set("logger", name, key)
    elif v is not None:
        out.no_effect[key] = "TensorBoard logs are written locally anyway (logger=csv or logger=wandb to change)"
    for st_key, field in (("tracker_project_name", "project"), ("tracker_run_name", "name")):
        if out.given(st_key):
            if name == "wandb":
                out.set(f"logger.wandb.{field}", out.read(st_key, as_str), st_key)
            else:
                out.no_effect[st_key] = "only used with report_to=wandb"


def _validation_disable(key, v, out):
    """No validation images, so nothing for the CLIP score either (it would still load CLIP)."""
    if as_bool(v):
        out.set("callbacks.validation", None, key)
        out.set("callbacks.clip_score", None, key)


def _huber_schedule(key, v, out):
    """Only a constant ``huber_c`` here (flow matching has no SNR schedule of its own)."""
    if name_of(v) == "constant":
        out.no_effect[key] = "huber_c is constant here (the only schedule)"
    elif name_of(out.settings.get("loss_type", "l2")) in ("huber", "smooth_l1"):
        raise ValueError("has no equivalent here; use constant (loss.huber_c stays fixed over sigma)")
    else:
        out.no_effect[key] = "only used with loss_type huber or smooth_l1"


def _rollout_strategy(key, v, out):
    if name_of(v) != "uniform":
        raise ValueError(
            "has no equivalent here; use uniform (rollout lengths are drawn uniformly from 1..max_step_offset)"
        )
    out.no_effect[key] = "rollout lengths are drawn uniformly here"


_SS = "scheduled_sampling."

_ATTENTION = {"diffusers": "sdpa", "native": "sdpa", "sageattention": "sageattention", "flash-attn": "flash",
              "flash-attn-2": "flash", "flex": "flex", "xformers": "xformers"}  # fmt: skip
_M, _Q = "model.", "model.quantization."

RULES: dict[str, Rule] = {
    # the model
    "model_family": only("flux", "this trainer trains Flux.1 (model_family flux)"),
    "model_type": only("lora", "this trainer trains LoRA/LoKr adapters (model_type lora)"),
    "model_flavour": _flavour,
    "pretrained_model_name_or_path": value(_M + "pretrained_model_name_or_path"),
    "pretrained_transformer_model_name_or_path": value(
        _M + "pretrained_transformer_model_name_or_path", optional(as_str)
    ),
    "pretrained_transformer_subfolder": value(_M + "pretrained_transformer_subfolder"),
    "pretrained_vae_model_name_or_path": value(_M + "pretrained_vae_model_name_or_path", optional(as_str)),
    "revision": value(_M + "revision", optional(as_str)),
    "mixed_precision": _mixed_precision,
    "flux_guidance_value": value(_M + "guidance_value", as_float),
    "flux_guidance_mode": one_of(_M + "flux_guidance_mode", "constant", "random-range"),
    "flux_guidance_min": value(_M + "flux_guidance_min", as_float),
    "flux_guidance_max": value(_M + "flux_guidance_max", as_float),
    "flux_attention_masked_training": value(_M + "flux_attention_masked_training", as_bool),
    "assistant_lora_path": value(_M + "assistant_lora_path", optional(as_str)),
    "assistant_lora_weight_name": value(_M + "assistant_lora_weight_name", optional(as_str)),
    "disable_assistant_lora": true_sets(_M + "assistant_lora_path", "none"),
    # quantization
    "base_model_precision": choice("quantization", QUANTIZATION),
    "base_model_default_dtype": one_of(_Q + "base_model_default_dtype", "bf16", "fp32"),
    "text_encoder_1_precision": _text_encoders,
    "text_encoder_2_precision": read_by("text_encoder_1_precision"),
    "quantize_via": one_of(_Q + "quantize_via", "cpu", "accelerator"),
    # memory and speed
    "attention_mechanism": choice(_M + "attention_backend", _ATTENTION),
    "gradient_checkpointing": value(_M + "gradient_checkpointing", as_bool),
    "gradient_checkpointing_interval": value(_M + "gradient_checkpointing_interval", as_int),
    "enable_group_offload": value(_M + "enable_group_offload", as_bool),
    "group_offload_type": one_of(_M + "group_offload_type", "block_level", "leaf_level"),
    "group_offload_blocks_per_group": value(_M + "group_offload_blocks_per_group", as_int),
    "group_offload_use_stream": no_effect(
        "training offloads without streams here (their prefetch runs in forward order, backward runs the other way)"
    ),
    "group_offload_to_disk_path": value(_M + "group_offload_to_disk_path", optional(as_str)),
    "enable_model_cpu_offload": value(_M + "enable_model_cpu_offload", as_bool),
    "offload_during_startup": no_effect("always so here: the caching encoders are freed before the transformer loads"),
    "vae_enable_tiling": value(_M + "vae_enable_tiling", as_bool),
    "tread_config": _tread,
    # the adapter
    "lora_type": choice("adapter", {"standard": "lora", "lycoris": "lokr"}, "use standard (LoRA) or lycoris (LoKr)"),
    "lycoris_config": _lycoris_config,
    "lora_rank": standard_lora(value("adapter.rank", as_rank)),
    "lora_alpha": standard_lora(value("adapter.alpha", optional(as_float))),
    "lora_dropout": standard_lora(value("adapter.dropout", as_float)),
    "flux_lora_target": standard_lora(
        one_of("adapter.target", "mmdit", "all", "all+ffs", "context", "context+ffs", "tiny", "nano")
    ),
    "lora_init_type": standard_lora(one_of("adapter.init", "default", "gaussian", "loftq", "olora", "pissa")),
    "init_lora": value("adapter.init_lora", optional(as_str)),
    # timesteps
    "flux_fast_schedule": _timesteps,
    "flow_schedule_shift": read_by("flux_fast_schedule"),
    "flow_schedule_auto_shift": read_by("flux_fast_schedule"),
    "flow_sigmoid_scale": read_by("flux_fast_schedule"),
    "flow_use_uniform_schedule": read_by("flux_fast_schedule"),
    # loss and scheduled sampling (rollout)
    "loss_type": one_of("loss.loss_type", "l2", "huber", "smooth_l1"),
    "huber_c": value("loss.huber_c", as_float),
    "huber_schedule": _huber_schedule,
    "scheduled_sampling_max_step_offset": value(_SS + "max_step_offset", as_int),
    "scheduled_sampling_probability": value(_SS + "probability", as_float),
    "scheduled_sampling_ramp_steps": value(_SS + "ramp_steps", as_int),
    "scheduled_sampling_prob_start": value(_SS + "prob_start", as_float),
    "scheduled_sampling_prob_end": value(_SS + "prob_end", as_float),
    "scheduled_sampling_sampler": choice(_SS + "sampler", {"euler": "euler", "unipc": "unipc", "dpm": "dpm"}),
    "scheduled_sampling_strategy": _rollout_strategy,
    # optimisation
    "optimizer": choice("optimizer", OPTIMIZERS),
    "learning_rate": value("optimizer.lr", as_float),
    "optimizer_beta1": _betas,
    "optimizer_beta2": read_by("optimizer_beta1"),
    "adam_weight_decay": value("optimizer.weight_decay", as_float),
    "lr_scheduler": _lr_scheduler,
    "lr_warmup_steps": read_by("lr_scheduler"),
    "lr_num_cycles": read_by("lr_scheduler"),
    "lr_power": read_by("lr_scheduler"),
    "max_grad_norm": _max_grad_norm,
    "grad_clip_method": one_of("trainer.gradient_clip_algorithm", "norm", "value"),
    "max_train_steps": _max_steps,
    "num_train_epochs": read_by("max_train_steps"),
    "gradient_accumulation_steps": value("trainer.accumulate_grad_batches", as_int),
    "seed": value("seed", as_int),
    # data
    "data_backend_config": _data_backend_config,
    "resolution": _resolution,
    "train_batch_size": value("dataset.batch_size", as_int),
    "vae_batch_size": value("dataset.vae_batch_size", as_int),
    "caption_dropout_probability": value("dataset.caption_dropout_probability", as_float),
    "resolution_type": no_effect("set per backend in data_backend_config (dataset.resolution is in pixels)"),
    "minimum_image_size": no_effect("set per backend in data_backend_config"),
    "aspect_bucket_rounding": no_effect("bucket sides are multiples of 64 here"),
    # outputs, checkpoints, logs, hub
    "output_dir": value("hydra.run.dir"),
    "resume_from_checkpoint": _resume,
    "checkpointing_steps": value("callbacks.model_checkpoint.every_n_train_steps", as_int),
    "checkpoint_step_interval": value("callbacks.model_checkpoint.every_n_train_steps", as_int),
    "checkpoints_total_limit": value(
        "callbacks.model_checkpoint.save_top_k", lambda v: optional(as_int)(v) or -1
    ),  # 0 = all
    "report_to": _report_to,
    "tracker_project_name": read_by("report_to"),
    "tracker_run_name": read_by("report_to"),
    "push_to_hub": value("callbacks.model_card.push_to_hub", as_bool),
    "hub_model_id": value("callbacks.model_card.hub_model_id", optional(as_str)),
    "push_checkpoints_to_hub": no_effect("only the final LoRA and its model card are uploaded"),
    # validation
    "validation_disable": _validation_disable,
    "validation_prompt": validation("validation_prompt", optional(as_str)),
    "validation_steps": validation("every_n_steps", as_int),
    "validation_step_interval": validation("every_n_steps", as_int),
    "validation_resolution": validation("validation_resolution", as_int_or_str),
    "validation_guidance": validation("validation_guidance", optional(as_float)),
    "validation_guidance_real": validation("validation_guidance_real", optional(as_float)),
    "validation_num_inference_steps": validation("validation_num_inference_steps", optional(as_int)),
    "validation_seed": validation("validation_seed", as_int),
    "validation_negative_prompt": validation("validation_negative_prompt", lambda v: "" if v is None else as_str(v)),
    "user_prompt_library": validation("user_prompt_library", optional(as_str)),
    "validation_preview": validation("validation_preview", as_bool),
    "validation_preview_steps": validation("validation_preview_steps", as_int),
    "disable_benchmark": validation("before_training", lambda v: not as_bool(v)),
    "validation_guidance_rescale": no_effect("Flux pipelines have no guidance rescale"),
    "validation_torch_compile": no_effect(
        "validation renders with the training transformer (compile=true compiles it)"
    ),
}

GROUPS = ("model", "quantization", "adapter", "dataset", "timesteps", "optimizer", "lr_scheduler", "logger")
