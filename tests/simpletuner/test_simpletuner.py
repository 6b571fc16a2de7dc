"""SimpleTuner settings, unchanged: the quickstart's own config.json settings compose to our equivalents."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from flux_lightning.config.validation import validate
from flux_lightning.run.train import config_dir
from flux_lightning.simpletuner.cli import expand_argv, load_settings
from flux_lightning.simpletuner.overrides import (
    LR_SCHEDULERS,
    OPTIMIZERS,
    QUANTIZATION,
    RULES,
    SettingError,
    to_overrides,
)

from ..conftest import REPO
from ..support.cli import flux_lightning

# The settings FLUX_QUICKSTART lists for config/config.json (values as it suggests them), then its
# example snippets verbatim: quantization, LoRA target, user prompt library, auto shift, TREAD,
# report_to/push_to_hub (the "log in to WandB and the Hub" section), written the way SimpleTuner
# reads them (keys with and without the leading "--").
QUICKSTART = {
    "model_type": "lora",
    "model_family": "flux",
    "model_flavour": "krea",
    "offload_during_startup": True,
    "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev",
    "pretrained_vae_model_name_or_path": "black-forest-labs/FLUX.1-dev",
    "output_dir": "output/models",
    "train_batch_size": 1,
    "validation_resolution": "1024x1024,1280x768,2048x2048",
    "validation_guidance": 3.5,
    "validation_guidance_real": 1.5,
    "validation_negative_prompt": "",
    "validation_num_inference_steps": 20,
    "gradient_accumulation_steps": 2,
    "optimizer": "adamw_bf16",
    "mixed_precision": "bf16",
    "gradient_checkpointing": True,
    "gradient_checkpointing_interval": 2,
    "data_backend_config": "config/multidatabackend.json",
    # 量化模型训练
    "base_model_precision": "int8-quanto",
    "text_encoder_1_precision": "no_change",
    "text_encoder_2_precision": "no_change",
    "lora_rank": 16,
    "max_grad_norm": 1.0,
    "base_model_default_dtype": "bf16",
    # LoRA 特定设置
    "--flux_lora_target": "all",
    # 验证提示词
    "--user_prompt_library": "config/user_prompt_library.json",
    # 自动偏移
    "--flow_schedule_auto_shift": True,
    # TREAD
    "tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]},
    "--push_to_hub": True,
    "--report_to": "wandb",
    "hub_model_id": "me/flux-lora",
}

# The quickstart's lowest-VRAM list: nf4-bnb, Lion 8bit paged, 512 px, batch 1, quantize on the CPU,
# sageattention, gradient checkpointing, VAE tiling, offload during startup, max_grad_norm 0.01.
LOW_VRAM = {
    "model_family": "flux",
    "base_model_precision": "nf4-bnb",
    "optimizer": "bnb-lion8bit-paged",
    "resolution": 512,
    "train_batch_size": 1,
    "--quantize_via": "cpu",
    "--attention_mechanism": "sageattention",
    "--gradient_checkpointing": True,
    "--vae_enable_tiling": "true",
    "--offload_during_startup": "true",
    "--max_grad_norm": 0.01,
}

# The custom fine-tune (Dev2Pro) snippet, exactly as printed (note its trailing comma).
DEV2PRO_AS_PRINTED = """{
    "model_family": "flux",
    "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev",
    "pretrained_transformer_model_name_or_path": "ashen0209/Flux-Dev2Pro",
    "pretrained_vae_model_name_or_path": "black-forest-labs/FLUX.1-dev",
    "pretrained_transformer_subfolder": "none",
}"""

# Group offload flags, LoftQ init, LoKr (lora_type=lycoris with its lr and the Attention/FeedForward preset).
GROUP_OFFLOAD = {
    "--enable_group_offload": True,
    "--group_offload_type": "block_level",
    "--group_offload_blocks_per_group": 1,
    "--group_offload_use_stream": True,
    "--group_offload_to_disk_path": "/fast-ssd/simpletuner-offload",
}
LOFTQ = {"--flux_lora_target": "all", "--lora_init_type": "loftq"}
LOKR = {"lora_type": "lycoris", "learning_rate": 1e-3, "lycoris_config": "config/lycoris_config.json"}
LOKR_PRESET = {
    "algo": "lokr",
    "multiplier": 1.0,
    "full_matrix": True,
    "linear_alpha": 1,
    "factor": 16,
    "apply_preset": {
        "target_module": ["Attention", "FeedForward"],
        "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}},
    },
}


def _write(folder, settings, name="config.json"):
    path = folder / "config" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings, indent=2, ensure_ascii=False))
    return path


def _compose(tmp_path, overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train",
            overrides=[*overrides, f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"],
            return_hydra_config=True,
        )


def _from_file(tmp_path, settings, **files):
    for name, content in files.items():
        _write(tmp_path, content, name)
    translation = to_overrides(load_settings(_write(tmp_path, settings)))
    return translation, _compose(tmp_path, translation.overrides)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A SimpleTuner-like launch dir: config/multidatabackend.json is the quickstart's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "examples" / "multibackend" / "multidatabackend.json", tmp_path / "config")
    return tmp_path


def test_quickstart_settings_compose_to_our_equivalents(in_tmp):
    translation, cfg = _from_file(in_tmp, QUICKSTART)
    assert translation.unrecognised == []
    run = validate(cfg, check_sources=False)
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.quantization, choices.adapter, choices.optimizer) == (
        "krea",
        "int8_quanto",
        "lora",
        "adamw_bf16",
    )
    assert (choices.dataset, choices.timesteps, choices.logger) == ("multibackend", "auto_shift", "wandb")
    m = run.model
    assert m.flavour == "krea" and m.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert m.pretrained_vae_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert m.dtype == "bf16" and m.gradient_checkpointing and m.gradient_checkpointing_interval == 2
    assert "offload_during_startup" in translation.no_effect  # always so here
    q = m.quantization
    assert (q.base_model_precision, q.base_model_default_dtype, q.text_encoder_precision) == (
        "int8_quanto",
        "bf16",
        "no_change",
    )
    assert (run.adapter.rank, run.adapter.target) == (16, "all")
    assert run.timesteps.flow_schedule_auto_shift
    assert [r.selection_ratio for r in run.tread.routes] == [0.5]
    assert [b.id for b in run.dataset.backends] == [
        "pseudo-camera-10k-flux",
        "dreambooth-subject",
        "dreambooth-subject-512",
    ]
    assert run.dataset.backends[0].is_regularisation_data and run.dataset.batch_size == 1
    t = cfg.trainer
    assert (t.precision, t.accumulate_grad_batches, t.gradient_clip_val) == ("bf16-mixed", 2, 1.0)
    assert t.gradient_clip_algorithm == "value"  # SimpleTuner's default grad_clip_method
    v = cfg.callbacks.validation
    assert v.validation_resolution == "1024x1024,1280x768,2048x2048" and v.validation_num_inference_steps == 20
    assert (v.validation_guidance, v.validation_guidance_real, v.validation_negative_prompt) == (3.5, 1.5, "")
    assert v.user_prompt_library == "config/user_prompt_library.json"
    assert cfg.callbacks.model_card.push_to_hub and cfg.callbacks.model_card.hub_model_id == "me/flux-lora"
    assert cfg.hydra.run.dir == "output/models"


def test_quickstart_low_vram_recipe(in_tmp):
    translation, cfg = _from_file(in_tmp, LOW_VRAM)
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.quantization, choices.optimizer) == ("krea", "nf4_bnb", "lion8bit_paged")
    m = cfg.model
    assert (m.quantization.quantize_via, m.attention_backend) == ("cpu", "sageattention")
    assert m.gradient_checkpointing and m.vae_enable_tiling
    assert (cfg.dataset.resolution, cfg.dataset.batch_size, cfg.trainer.gradient_clip_val) == (512, 1, 0.01)


def test_quickstart_dev2pro_snippet(in_tmp):
    with pytest.raises(SettingError, match=r"config.json is not valid JSON .*no trailing commas"):
        load_settings(_write(in_tmp, DEV2PRO_AS_PRINTED))
    translation, cfg = _from_file(in_tmp, DEV2PRO_AS_PRINTED.replace('"none",\n}', '"none"\n}'))
    assert cfg.hydra.runtime.choices.model == "dev"  # no model_flavour: the flavour whose repo it names
    assert cfg.model.pretrained_transformer_model_name_or_path == "ashen0209/Flux-Dev2Pro"
    assert cfg.model.pretrained_transformer_subfolder == "none"
    validate(cfg, check_sources=False)


def test_quickstart_group_offload_loftq_and_lokr(in_tmp):
    translation, cfg = _from_file(in_tmp, {**GROUP_OFFLOAD, **LOFTQ})
    m = cfg.model
    assert m.enable_group_offload and m.group_offload_type == "block_level"
    assert "group_offload_use_stream" in translation.no_effect  # training offloads without streams
    assert (m.group_offload_blocks_per_group, m.group_offload_to_disk_path) == (1, "/fast-ssd/simpletuner-offload")
    assert (cfg.adapter.target, cfg.adapter.init) == ("all", "loftq")
    _, cfg = _from_file(in_tmp, LOKR, **{"lycoris_config.json": LOKR_PRESET})
    run = validate(cfg, check_sources=False)
    assert run.adapter.type == "lokr" and cfg.optimizer.lr == 1e-3
    assert (run.adapter.factor, run.adapter.ff_factor, run.adapter.full_matrix, run.adapter.target) == (
        16,
        8,
        True,
        "attention+ff",
    )


# One valid value for every key the table knows (the two spellings of an alias agree).
EVERY_KEY = {
    "model_family": "flux", "model_type": "lora", "model_flavour": "dev", "flux_fast_schedule": False,
    "flow_schedule_shift": 3.0, "flow_schedule_auto_shift": False, "flow_sigmoid_scale": 1.5,
    "flow_use_uniform_schedule": False, "pretrained_model_name_or_path": "/models/flux",
    "pretrained_transformer_model_name_or_path": "ashen0209/Flux-Dev2Pro", "pretrained_transformer_subfolder": "none",
    "pretrained_vae_model_name_or_path": "black-forest-labs/FLUX.1-dev", "revision": "main", "mixed_precision": "bf16",
    "base_model_precision": "int4-quanto", "base_model_default_dtype": "bf16", "text_encoder_1_precision": "int8-quanto",
    "text_encoder_2_precision": "int8-quanto", "quantize_via": "cpu", "flux_guidance_value": 1.0,
    "flux_guidance_mode": "random-range", "flux_guidance_min": 1.0, "flux_guidance_max": 4.0,
    "flux_attention_masked_training": True, "assistant_lora_path": "a/b", "assistant_lora_weight_name": "w.safetensors",
    "disable_assistant_lora": False, "attention_mechanism": "diffusers", "gradient_checkpointing": "true",
    "gradient_checkpointing_interval": 2, "enable_group_offload": True, "group_offload_type": "leaf_level",
    "group_offload_blocks_per_group": 1, "group_offload_use_stream": True, "group_offload_to_disk_path": "/tmp/off",
    "enable_model_cpu_offload": False, "offload_during_startup": True, "vae_enable_tiling": True,
    "lora_type": "lycoris", "lycoris_config": LOKR_PRESET, "lora_rank": 8, "lora_alpha": 8, "lora_dropout": 0.05,
    "flux_lora_target": "mmdit", "lora_init_type": "gaussian", "init_lora": "old.safetensors",
    "tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]},
    "optimizer": "optimi-stableadamw", "learning_rate": "1e-4", "optimizer_beta1": 0.9, "optimizer_beta2": 0.99,
    "adam_weight_decay": 0.01, "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 10, "lr_num_cycles": 2,
    "lr_power": 2.0, "max_grad_norm": 0.5, "grad_clip_method": "norm", "max_train_steps": 100, "num_train_epochs": 3,
    "gradient_accumulation_steps": 4, "seed": 7, "data_backend_config": "config/multidatabackend.json",
    "resolution": 1024, "train_batch_size": 2, "vae_batch_size": 8, "caption_dropout_probability": 0.05,
    "resolution_type": "pixel_area", "minimum_image_size": 0, "aspect_bucket_rounding": 2, "output_dir": "out/st",
    "resume_from_checkpoint": "latest", "checkpointing_steps": 250, "checkpoint_step_interval": 250,
    "checkpoints_total_limit": 0, "push_to_hub": False, "hub_model_id": "me/x", "push_checkpoints_to_hub": False,
    "report_to": "wandb", "tracker_project_name": "proj", "tracker_run_name": "run1",
    "validation_prompt": "a \"quoted\", comma'd prompt \\ with ${braces}", "validation_steps": 50, "validation_step_interval": 50,
    "validation_resolution": 1024, "validation_guidance": 4.0, "validation_guidance_real": 1.0,
    "validation_num_inference_steps": "28", "validation_seed": 3, "validation_negative_prompt": "blurry",
    "user_prompt_library": "prompts.json", "validation_preview": False, "validation_preview_steps": 5,
    "disable_benchmark": True, "validation_disable": False, "validation_guidance_rescale": 0.0,
    "validation_torch_compile": False,
    "loss_type": "huber", "huber_c": 0.2, "huber_schedule": "constant",
    "scheduled_sampling_max_step_offset": 5, "scheduled_sampling_probability": 0.5,
    "scheduled_sampling_ramp_steps": 100, "scheduled_sampling_prob_start": 0.1, "scheduled_sampling_prob_end": 0.6,
    "scheduled_sampling_sampler": "euler", "scheduled_sampling_strategy": "uniform",
}  # fmt: skip


def _expect(cfg, override):
    """The composed value at an override's key equals the override's value (groups: the choice)."""
    o = OverridesParser.create().parse_override(override)
    key, want = o.key_or_group, o.value()
    if key in cfg.hydra.runtime.choices:
        return cfg.hydra.runtime.choices[key] == want
    got = OmegaConf.select(cfg, key)
    got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
    if isinstance(want, str) and "\\${" in want:
        want = want.replace("\\${", "${")
    return got == want


def test_every_recognised_key_composes_and_lands_where_the_table_says(in_tmp):
    assert set(EVERY_KEY) == set(RULES), "EVERY_KEY must cover the whole table"
    translation = to_overrides(EVERY_KEY)
    assert translation.unrecognised == []
    cfg = _compose(in_tmp, translation.overrides)
    assert [o for o in translation.overrides if not _expect(cfg, o)] == []
    assert cfg.callbacks.validation.validation_prompt == EVERY_KEY["validation_prompt"]  # quotes, commas, \, ${ survive
    assert cfg.hydra.runtime.choices.timesteps == "flavour" and cfg.timesteps.weighting is None  # dev: sigmoid
    assert cfg.callbacks.model_checkpoint.save_top_k == -1  # SimpleTuner's 0 = keep all
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (100, 3)
    assert cfg.lr_scheduler.num_cycles == 2 and "lr_power" in translation.no_effect
    assert cfg.callbacks.validation.before_training is False  # disable_benchmark
    assert {"lora_rank", "lora_alpha", "flux_lora_target", "lora_init_type"} <= set(translation.no_effect)  # lycoris
    assert to_overrides({"disable_assistant_lora": True}).overrides == ["model.assistant_lora_path='none'"]
    # every key is mapped, or reported as having no effect: nothing silently dropped
    for key, rule in RULES.items():
        if hasattr(rule, "no_effect"):
            assert key in translation.no_effect


def test_every_choice_of_the_tables_composes(tmp_path):
    tables = [
        [("base_model_precision", v) for v in QUANTIZATION],
        [("optimizer", v) for v in OPTIMIZERS],
        [("lr_scheduler", v) for v in LR_SCHEDULERS],
        [("model_flavour", v) for v in ("krea", "dev", "kontext", "fluxbooru", "libreflux", "schnell")],
        [("attention_mechanism", v) for v in ("diffusers", "sageattention", "flash-attn", "flex", "xformers")],
        [("report_to", v) for v in ("tensorboard", "wandb", "none")],
        [("mixed_precision", v) for v in ("bf16", "fp16", "no")],
        [("lora_type", v) for v in ("standard", "lycoris")],
    ]
    longest = max(len(t) for t in tables)
    cases = [dict(t[i % len(t)] for t in tables) for i in range(longest)]  # every value at least once
    cases += [{"flux_fast_schedule": True}, {"flow_schedule_auto_shift": True, "flow_schedule_shift": 2}]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for settings in cases:
            overrides = to_overrides(settings).overrides
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
            assert all(_expect(cfg, o) for o in overrides), settings
    assert to_overrides({"model_flavour": "schnell"}).overrides[:2] == ["model=schnell", "timesteps=schnell_fast"]


def test_validation_disable_drops_validation_and_its_settings(tmp_path):
    translation = to_overrides({"validation_disable": "true", "validation_steps": 100, "validation_prompt": "a cat"})
    assert translation.overrides == ["callbacks.clip_score=null", "callbacks.validation=null"]
    assert set(translation.no_effect) == {"validation_steps", "validation_prompt"}
    cfg = _compose(tmp_path, translation.overrides)
    assert cfg.callbacks.validation is None and cfg.callbacks.clip_score is None


def test_values_without_equivalent_fail_with_one_line_each_naming_key_and_fix():
    with pytest.raises(SettingError) as info:
        to_overrides(
            {"--optimizer": "adafactor", "base_model_precision": "int8-torchao", "lora_rank": "many", "lora_alpha": 4}
        )
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(
        "base_model_precision='int8-torchao' has no equivalent here; use one of no_change, bf16, fp32, int8-quanto"
    )
    assert lines[1].startswith("lora_rank='many' is not a whole number")
    assert lines[2].startswith("optimizer='adafactor' has no equivalent here; use one of adamw_bf16")
    with pytest.raises(SettingError, match="lora_rank is given twice with different values"):
        to_overrides({"--lora_rank": 4, "lora_rank": 8})
    with pytest.raises(
        SettingError, match="checkpointing_steps=100 and checkpoint_step_interval=200 both set .*; keep one"
    ):
        to_overrides({"checkpointing_steps": 100, "checkpoint_step_interval": 200})
    with pytest.raises(SettingError, match="text_encoder_1_precision and text_encoder_2_precision differ"):
        to_overrides({"text_encoder_1_precision": "int8-quanto", "text_encoder_2_precision": "no_change"})


def test_unknown_keys_are_listed_in_one_warning_line_and_no_effect_keys_say_so(tmp_path, capsys):
    path = _write(tmp_path, {"lora_rank": 4, "--use_ema": True, "snr_gamma": 5, "report_to": "none"})
    argv = expand_argv(["prog", f"simpletuner_config={path}"])
    assert argv == ["prog", "adapter.rank=4"]
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "ignoring keys" in line] == [
        "warning: simpletuner_config: ignoring keys this trainer does not know: snr_gamma, use_ema"
    ]
    assert any(line.startswith("warning:") and "report_to (TensorBoard logs are written" in line for line in err)


def test_the_command_line_wins_over_config_json(tmp_path, capsys):
    path = _write(tmp_path, {"model_flavour": "krea", "lora_rank": 4, "learning_rate": 1e-4, "validation_steps": 50,
                             "base_model_precision": "int8-quanto", "optimizer": "optimi-lion"})  # fmt: skip
    user = ["model=dev", "optimizer.lr=3e-4", "callbacks.validation=null", "adapter=lokr"]
    argv = expand_argv(["prog", "-m", user[0], f"simpletuner_config={path}", *user[1:], "--cfg", "job"])
    assert argv == [
        "prog",
        "-m",
        "quantization=int8_quanto",
        "optimizer=optimi_lion",
        "adapter.rank=4",
        *user,
        "--cfg",
        "job",
    ]
    assert "the command line replaces model=krea" in capsys.readouterr().err
    cfg = _compose(tmp_path, argv[2:-2])
    assert (cfg.model.flavour, cfg.optimizer.name, cfg.optimizer.lr, cfg.adapter.rank) == (
        "dev",
        "optimi_lion",
        3e-4,
        4,
    )
    assert cfg.callbacks.validation is None and cfg.adapter.type == "lokr"
    assert expand_argv(["prog", "trainer.max_steps=1"]) == ["prog", "trainer.max_steps=1"]


def test_bad_config_stops_the_program_with_one_line(tmp_path, monkeypatch, capsys):
    from flux_lightning.run.train import main

    monkeypatch.setattr(sys, "argv", ["prog", f"simpletuner_config={_write(tmp_path, {'optimizer': 'adafactor'})}"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: simpletuner_config: optimizer='adafactor' has no equivalent here; use one of adamw_bf16, torch-adamw, "
        "adamw, optimi-lion, optimi-stableadamw, bnb-adamw8bit, bnb-lion8bit-paged, prodigy"
    ]


def test_cli_prints_the_composed_job(in_tmp):
    path = _write(in_tmp, {**QUICKSTART, "--some_new_flag": 1})
    proc = subprocess.run(
        flux_lightning(f"simpletuner_config={path}", "adapter.rank=4", "--cfg", "job"),
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert (job["model"]["flavour"], job["model"]["quantization"]["base_model_precision"]) == ("krea", "int8_quanto")
    assert job["adapter"]["rank"] == 4 and job["optimizer"]["name"] == "adamw_bf16"  # the command line won
    assert job["dataset"]["backend_file"] == "config/multidatabackend.json"
    assert job["tread"]["routes"][0]["selection_ratio"] == 0.5
    assert job["callbacks"]["validation"]["validation_resolution"] == "1024x1024,1280x768,2048x2048"
    assert "warning: simpletuner_config: ignoring keys this trainer does not know: some_new_flag" in proc.stderr


def test_a_simpletuner_config_trains_end_to_end(tiny_model_cfg, in_tmp):
    """config.json + multidatabackend.json (US-spelled regularisation flag) train the tiny flavour."""
    from PIL import Image

    from flux_lightning.run.train import train

    for folder, colour in (("reg", (200, 40, 40)), ("subject", (40, 40, 200))):
        for i in range(2):
            (in_tmp / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (colour[0], 40 * i, colour[2])).save(
                in_tmp / "data" / folder / f"a photo {i}.png"
            )
    backends = [
        {"id": "reg", "type": "local", "instance_data_dir": "data/reg", "resolution": 64, "caption_strategy": "filename",
         "is_regularization_data": True},
        {"id": "subject", "type": "local", "instance_data_dir": "data/subject", "resolution": 64,
         "caption_strategy": "instanceprompt", "instance_prompt": "sks thing", "repeats": 1},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]  # fmt: skip
    _write(in_tmp, backends, "multidatabackend.json")
    path = _write(in_tmp, {
        "--model_family": "flux", "--model_type": "lora", "--lora_rank": 2, "--optimizer": "torch-adamw",
        "--learning_rate": "1e-3", "--lr_scheduler": "constant", "--lr_warmup_steps": 1, "--max_train_steps": 3,
        "--train_batch_size": 1, "--data_backend_config": "config/multidatabackend.json", "--seed": 3,
        "--checkpointing_steps": 1, "--checkpoints_total_limit": 2, "--validation_prompt": "sks thing",
        "--validation_resolution": "64x64", "--validation_steps": 0, "--disable_benchmark": True,
        "--caption_dropout_probability": 0.0, "--report_to": "none",
    })  # fmt: skip
    argv = expand_argv([
        "prog", f"simpletuner_config={path}", "model=tiny", f"model.cache_dir={tiny_model_cfg.cache_dir}",
        "callbacks.eval_loss=null", "callbacks.clip_score=null",
    ])  # fmt: skip
    cfg = _compose(in_tmp, argv[1:])
    assert cfg.hydra.runtime.choices.lr_scheduler == "constant_with_warmup"
    assert [b.is_regularisation_data for b in validate(cfg).dataset.backends] == [True, False]
    loss = train(cfg)
    run = in_tmp / "run"
    assert loss > 0 and (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step000002.ckpt",
        "step000003.ckpt",
    ]
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step_3"]  # no benchmark, final images only


# -- hostile config.json files: exit 2, one line naming the key (issue 23) --------------------------
def _lycoris(preset):
    return {"lora_type": "lycoris", "lycoris_config": {"algo": "lokr", "apply_preset": preset}}


# (id, file text or settings, words the error line names)
HOSTILE_CONFIGS = [
    ("deeply-nested-list", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("deeply-nested-object", '{"a":' * 5000 + "1" + "}" * 5000, ["nested too deeply"]),
    (
        "nested-past-the-limit",
        {"tread_config": {"routes": [{"a": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}]}},
        ["tread_config.routes[0].a", "nested deeper"],
    ),
    ("apply_preset-string", _lycoris("x"), ["apply_preset='x'", "object"]),
    ("target_module-number", _lycoris({"target_module": 5}), ["target_module=5", "list of names"]),
    ("target_module-list-of-numbers", _lycoris({"target_module": [1, 2]}), ["target_module=[1, 2]"]),
    (
        "module_algo_map-list",
        _lycoris({"target_module": ["Attention"], "module_algo_map": [1]}),
        ["module_algo_map=[1]"],
    ),
    ("module_algo_map-entry", _lycoris({"module_algo_map": {"FeedForward": 8}}), ["module_algo_map=", "FeedForward"]),
    ("ff-factor-text", _lycoris({"module_algo_map": {"FeedForward": {"factor": "x"}}}), ["FeedForward.factor='x'"]),
    ("lycoris-multiplier-text", {"lora_type": "lycoris", "lycoris_config": {"multiplier": "x"}}, ["multiplier='x'"]),
    ("lycoris-linear_dim-huge", {"lora_type": "lycoris", "lycoris_config": {"linear_dim": 1e30}}, ["linear_dim=1e+30"]),
    ("lora_rank-1e30", {"lora_rank": 1e30}, ["lora_rank=1e+30", "too large"]),
    ("lora_rank-above-width", {"lora_rank": 4096}, ["lora_rank=4096", "3072"]),
    ("lora_rank-negative", {"lora_rank": -3}, ["lora_rank=-3"]),
    ("lora_rank-infinite", '{"lora_rank": 1e999}', ["lora_rank=inf"]),
    ("learning_rate-nan", '{"learning_rate": NaN}', ["learning_rate=nan", "finite"]),
    ("lora_alpha-infinite", '{"lora_alpha": Infinity}', ["lora_alpha=inf", "finite"]),
    ("max_train_steps-1e30", {"max_train_steps": 1e30}, ["max_train_steps=1e+30"]),
    ("seed-huge", {"seed": 10**30}, ["seed=", "too large"]),
    ("long-value", {"train_batch_size": list(range(100_000))}, ["train_batch_size=[0, 1, 2", "..."]),
    ("top-level-list", [1], ["must hold one JSON object"]),
    ("empty-file", "", ["not valid JSON"]),
]


@pytest.mark.parametrize("case", HOSTILE_CONFIGS, ids=[c[0] for c in HOSTILE_CONFIGS])
def test_hostile_config_json_exits_2_with_one_line_naming_the_key(case, tmp_path, monkeypatch, capsys):
    from flux_lightning.run.train import main

    from ..support.hostile import exits_2

    name, settings, words = case
    path = _write(tmp_path, settings)
    monkeypatch.setattr(sys, "argv", ["prog", f"simpletuner_config={path}", "--cfg", "job"])
    line = exits_2(main, capsys, "simpletuner_config", *words)
    assert len(line) < 400, line


def test_a_hostile_config_json_is_one_line_from_the_command(tmp_path):
    from ..support.hostile import process_exits_2

    path = _write(tmp_path, _lycoris({"target_module": 5}))
    proc = subprocess.run(
        flux_lightning(f"simpletuner_config={path}"),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    process_exits_2(proc, "lycoris_config: apply_preset.target_module=5")


def test_many_unknown_keys_are_counted_not_all_listed(tmp_path, capsys):
    path = _write(tmp_path, {"lora_rank": 4, **{f"key_{i:06d}": 1 for i in range(200_000)}})
    assert expand_argv(["prog", f"simpletuner_config={path}"]) == ["prog", "adapter.rank=4"]
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "ignoring keys" in line]
    assert line.endswith(", key_000019 and 199980 more") and len(line) < 500, line[:1000]
    assert "key_000000, key_000001" in line
