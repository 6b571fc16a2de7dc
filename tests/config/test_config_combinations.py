"""Settings that cannot run (together) fail in ``validate()`` with one line naming the fix, before any
weights load or model folder is built."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import flux_lightning.config.validation as config_module
from flux_lightning.config.validation import ConfigError, validate
from flux_lightning.run.train import config_dir

from ..support.cli import flux_lightning


def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", *overrides]
        )


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if validation gets as far as resolving (building/probing) a model source."""

    def forbidden(*args, **kwargs):
        raise AssertionError("validate() reached the model source although the config is invalid")

    monkeypatch.setattr(config_module, "resolve_source", forbidden)


INCOMPATIBLE = [
    (
        ("quantization=int8_quanto", "adapter.init=loftq"),
        "adapter.init=loftq rewrites the base weights and cannot run on a quantized base",
    ),
    (("quantization=int4_quanto", "adapter.init=pissa"), "adapter.init=pissa rewrites the base weights"),
    (
        ("model.enable_group_offload=true", "model.enable_model_cpu_offload=true"),
        "model.enable_group_offload and model.enable_model_cpu_offload are mutually exclusive",
    ),
    (
        ("optimizer=adamw_bf16", "model.quantization.base_model_default_dtype=fp32"),
        "optimizer=adamw_bf16 holds the adapter in bf16 but quantization.base_model_default_dtype=fp32",
    ),
    (("model.tiny_like=schnell", "timesteps=sigmoid"), "trains with its fast schedule but timesteps.weighting=sigmoid"),
    (("model=schnell", "timesteps=auto_shift"), "flavour schnell trains with its fast schedule"),
    (
        ("model.tiny_like=kontext", "dataset.instance_data_dir=/data/targets"),
        "dataset.conditioning_data_dir is required",
    ),
    (
        ("dataset.conditioning_data_dir=/refs",),
        "dataset.conditioning_data_dir gives reference images, which flavour tiny does not use",
    ),
    (
        ("model=schnell", "timesteps=schnell_fast", "adapter=lokr"),
        "the assistant LoRA of flavour schnell stacks under a LoRA, not a lokr",
    ),
    (
        ("model.tiny_like=libreflux", "model.flux_attention_masked_training=false"),
        "flavour libreflux was trained with the T5 padding mask",
    ),
    (
        ("model.tiny_like=libreflux", "model.attention_backend=flex", "model.flux_guidance_mode=random-range"),
        "flavour libreflux has no guidance embedding",
    ),
    (
        ("model.flux_guidance_mode=random-range", "model.flux_guidance_min=5", "model.flux_guidance_max=2"),
        "flux_guidance_min=5.0 > flux_guidance_max=2.0",
    ),
    (
        ("model.attention_backend=sageattention",),
        "model.attention_backend=sageattention needs the sageattention package",
    ),
    (("model.tiny_like=turbo",), "model.tiny_like='turbo' is unknown"),
    (("model=krea", "model.tiny_like=dev"), "model.tiny_like=dev only applies to model.flavour=tiny"),
    (("quantization=int8_quanto", "model.quantization.quantize_via=gpu"), "quantization.quantize_via='gpu' is unknown"),
    (("optimizer.name=sgd",), "optimizer.name='sgd' is unknown"),
    (("adapter=lokr", "adapter.init=gaussian"), "LoKr takes adapter.init=default"),
    (("model.gradient_checkpointing_interval=0",), "model.gradient_checkpointing_interval=0 must be >= 1"),
    (
        ("model.enable_group_offload=true", "model.gradient_checkpointing=false"),
        "model.enable_group_offload needs model.gradient_checkpointing=true and gradient_checkpointing_interval=1",
    ),
    (
        ("model.enable_group_offload=true", "model.gradient_checkpointing_interval=2"),
        "model.enable_group_offload needs model.gradient_checkpointing=true and gradient_checkpointing_interval=1",
    ),
    (
        ("model.enable_group_offload=true", "model.group_offload_use_stream=true"),
        "model.group_offload_use_stream prefetches in forward order",
    ),
    (
        ("model.enable_group_offload=true", "quantization=int8_quanto"),
        "model.enable_group_offload moves unquantized linear weights only",
    ),
    (
        ("model.group_offload_blocks_per_group=2",),
        "model.group_offload_blocks_per_group=2: the backward pass recomputes one block at a time",
    ),
    (("adapter.init_lora=/no/such.safetensors",), "adapter.init_lora: file '/no/such.safetensors' does not exist"),
]


@pytest.mark.parametrize("overrides,message", INCOMPATIBLE, ids=[" ".join(o) for o, _ in INCOMPATIBLE])
def test_incompatible_settings_fail_at_start_up(tmp_path, nothing_loads, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(_compose(tmp_path, *overrides))
    assert message in str(info.value)
    line = next(l for l in str(info.value).splitlines() if message in l)
    assert ";" in line or "use" in line, "the line names no fix"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_group_offload_without_a_gpu_is_refused(tmp_path, nothing_loads):
    with pytest.raises(ConfigError, match="model.enable_group_offload needs a CUDA GPU"):
        validate(_compose(tmp_path, "model.enable_group_offload=true"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_loftq_without_a_gpu_is_refused(tmp_path, nothing_loads):
    with pytest.raises(ConfigError, match="adapter.init=loftq needs a CUDA GPU"):
        validate(_compose(tmp_path, "adapter.init=loftq"))


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.tiny_like=schnell", "timesteps=schnell_fast"),
        ("model.tiny_like=schnell", "timesteps.force_schedule=true"),
        ("model.tiny_like=kontext", "dataset=kontext_pairs"),
        ("model.tiny_like=libreflux",),
        ("quantization=nf4_bnb", "optimizer=lion8bit_paged"),
        ("quantization=int4_quanto", "adapter=lokr", "optimizer=prodigy"),
        ("model.tiny_like=dev", "model.flux_guidance_mode=random-range"),
        (
            "model.vae_enable_tiling=true",
            "model.enable_model_cpu_offload=true",
            "model.gradient_checkpointing_interval=2",
        ),
    ],
)
def test_compatible_combinations_validate(tmp_path, overrides):
    run = validate(_compose(tmp_path, *overrides), check_sources=False)
    assert run.model.flavour == "tiny"


def test_all_problems_of_a_combination_are_listed_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate(
            _compose(
                tmp_path,
                "quantization=int8_quanto",
                "adapter.init=loftq",
                "model.enable_group_offload=true",
                "model.enable_model_cpu_offload=true",
            )
        )
    text = str(info.value)
    assert "loftq" in text and "mutually exclusive" in text


def test_the_removed_startup_offload_switch_is_refused(tmp_path):
    """``model.offload_during_startup`` did nothing (the caching encoders are always freed before the
    transformer loads), so it is gone: setting it is an error, not a silent no-op."""
    with pytest.raises(Exception, match="offload_during_startup"):
        validate(_compose(tmp_path, "model.offload_during_startup=true"))


# Values that reach Lightning and torch untyped (trainer kwargs, optimizer, LR schedule, intervals):
# each is refused in validate() with one line naming the field and the fix, before anything loads.
LOOP_VALUES = [
    (("trainer.max_steps=-5",), "trainer.max_steps=-5 must be a positive integer, or -1 for no limit"),
    (("trainer.max_steps=0",), "trainer.max_steps=0 must be a positive integer"),
    (("trainer.max_steps=ten",), "trainer.max_steps='ten' must be a positive integer"),
    (("trainer.max_epochs=0",), "trainer.max_epochs=0 must be a positive integer"),
    (("trainer.max_steps=-1",), "trainer.max_steps=-1 with no trainer.max_epochs trains until killed"),
    (("trainer.max_steps=-1", "trainer.max_epochs=null"), "trainer.max_steps=-1 with no trainer.max_epochs"),
    (("optimizer.lr=-1",), "optimizer.lr=-1.0 must be a number > 0"),
    (("optimizer.lr=0",), "optimizer.lr=0.0 must be a number > 0"),
    (("optimizer.betas=[0.9,1.5]",), "optimizer.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    (("optimizer.betas=[0.9]",), "optimizer.betas=[0.9] must be two numbers in [0, 1)"),
    (("optimizer.weight_decay=-0.1",), "optimizer.weight_decay=-0.1 must be >= 0"),
    (("optimizer.eps=0",), "optimizer.eps=0.0 must be > 0"),
    (("trainer.gradient_clip_val=-1",), "trainer.gradient_clip_val=-1 must be a number >= 0"),
    (("trainer.gradient_clip_algorithm=max",), "trainer.gradient_clip_algorithm='max' is unknown; use norm or value"),
    (("trainer.accumulate_grad_batches=0",), "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    (("trainer.log_every_n_steps=0",), "trainer.log_every_n_steps=0 must be an integer >= 1"),
    (("trainer.precision=bf16-mix",), "trainer.precision='bf16-mix' is not a Lightning precision"),
    (("trainer.precision=8",), "trainer.precision=8 is not a Lightning precision"),
    (("trainer.devices=0",), "trainer.devices=0 must be a count >= 1, -1 (all), auto"),
    (("trainer.num_nodes=0",), "trainer.num_nodes=0 must be an integer >= 1"),
    (
        ("callbacks.model_checkpoint.every_n_train_steps=-10",),
        "callbacks.model_checkpoint.every_n_train_steps=-10 must be an integer >= 0",
    ),
    (
        ("callbacks.model_checkpoint.save_top_k=-2",),
        "callbacks.model_checkpoint.save_top_k=-2 must be an integer >= -1",
    ),
    (("callbacks.validation.every_n_steps=-1",), "callbacks.validation.every_n_steps=-1 must be an integer >= 0"),
    (("callbacks.eval_loss.every_n_steps=1.5",), "callbacks.eval_loss.every_n_steps=1.5 must be an integer >= 0"),
    (("lr_scheduler.name=warmup_cosine",), "lr_scheduler.name='warmup_cosine' is unknown; use one of constant"),
    (("lr_scheduler=cosine", "lr_scheduler.num_warmup_steps=-1"), "lr_scheduler.num_warmup_steps=-1 must be >= 0"),
    (
        ("lr_scheduler.num_warmup_steps=50",),
        "lr_scheduler.num_warmup_steps=50 does nothing with lr_scheduler.name=constant",
    ),
    (("lr_scheduler=cosine", "trainer.max_steps=80"), "lr_scheduler.num_warmup_steps=100 >= trainer.max_steps=80"),
    (
        ("lr_scheduler=cosine", "trainer.max_steps=-1", "trainer.max_epochs=2"),
        "lr_scheduler=cosine decays over trainer.max_steps, which is -1",
    ),
    (("lr_scheduler=polynomial", "lr_scheduler.power=0"), "lr_scheduler.power=0.0 must be > 0"),
    (("nonfinite_max_consecutive=0",), "nonfinite_max_consecutive=0 must be an integer >= 1"),
]


@pytest.mark.parametrize("overrides,message", LOOP_VALUES, ids=[" ".join(o) for o, _ in LOOP_VALUES])
def test_trainer_and_optimizer_values_are_checked_before_anything_loads(tmp_path, nothing_loads, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(_compose(tmp_path, *overrides))
    lines = [l for l in str(info.value).splitlines() if message in l]
    assert len(lines) == 1, str(info.value)
    assert ";" in lines[0] or "use" in lines[0], "the line names no fix"


@pytest.mark.parametrize(
    "overrides",
    [
        ("trainer.max_steps=-1", "trainer.max_epochs=3"),
        ("trainer.max_steps=-1", "allow_endless_run=true"),
        ("trainer.max_steps=-1", "+trainer.max_time=00:01:00:00"),
        ("lr_scheduler=cosine", "trainer.max_steps=1000", "lr_scheduler.num_warmup_steps=0"),
        ("lr_scheduler=constant_with_warmup", "trainer.max_steps=-1", "trainer.max_epochs=2"),
        ("trainer.precision=16", "trainer.devices=[0,1]", "trainer.gradient_clip_val=null"),
        ("trainer.precision=bf16-true", "trainer.devices=auto", "trainer.gradient_clip_algorithm=value"),
        ("optimizer.betas=[0.9,0.99]", "optimizer.weight_decay=0", "optimizer.eps=1e-8"),
        ("callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.every_n_train_steps=0"),
    ],
)
def test_valid_trainer_and_optimizer_values_pass(tmp_path, overrides):
    validate(_compose(tmp_path, *overrides), check_sources=False)


def test_bad_trainer_values_exit_2_with_one_line_each_and_no_traceback(tmp_path):
    import subprocess

    def cli(*overrides):  # from a scratch dir: the run dir (outputs/runs/demo) lands there
        return subprocess.run(
            flux_lightning(f"paths.cache_dir={tmp_path}/cache", *overrides),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )

    proc = cli("trainer.max_steps=-5", "optimizer.lr=-1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "  - trainer.max_steps=-5 must be a positive integer" in proc.stderr
    assert "  - optimizer.lr=-1.0 must be a number > 0" in proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing was built or loaded
    proc = cli("trainer.max_steps=-1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "allow_endless_run=true" in proc.stderr
