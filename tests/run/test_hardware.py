"""GPU detection and the device choice (flux_lightning.run.hardware), with the accelerator query mocked:
0, 1 and 4 GPUs -> devices, strategy, CUDA_VISIBLE_DEVICES and the Hydra overrides; `trainer.devices=auto`
resolved where the CLI builds its trainer; the summary's devices and strategy rows."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flux_lightning.config.schema import config_dir, register
from flux_lightning.run import train as train_mod
from flux_lightning.run.hardware import (
    GIB,
    Accelerator,
    choose_devices,
    detect_accelerators,
    device_summary_rows,
    memory_suggestion,
    resolve_trainer_devices,
)

H100 = 80 * GIB


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)`` makes torch see ``n`` H100s (the count, the properties; CUDA 'initialised', so no
    NVML is asked)."""

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)

        def props(i):
            if not 0 <= i < n:
                raise AssertionError(f"asked for device {i} of {n}")
            return SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=H100)

        monkeypatch.setattr(torch.cuda, "get_device_properties", props)

    return install


@pytest.mark.parametrize("n", [0, 1, 4])
def test_detect_and_auto_choice_for_0_1_4_gpus(gpus, monkeypatch, n):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus(n)
    found = detect_accelerators()
    assert found == [Accelerator(i, "NVIDIA H100 80GB HBM3", H100) for i in range(n)]
    choice = choose_devices("auto")
    expected = {
        0: (1, "auto", "cpu", ["trainer.accelerator=cpu", "trainer.devices=auto"], "CPU"),
        1: (1, "auto", "gpu", ["trainer.devices=auto"], "1 GPU, no DDP"),
        4: (4, "ddp", "gpu", ["trainer.devices=auto"], "4 GPUs, strategy ddp"),
    }[n]
    assert (choice.devices, choice.strategy, choice.accelerator, choice.overrides, choice.describe()) == expected
    assert choice.env == {}


def test_manual_and_off_choices(gpus, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus(4)
    two = choose_devices("manual", [1, 3])
    assert (two.devices, two.strategy, two.env) == (2, "ddp", {"CUDA_VISIBLE_DEVICES": "1,3"})
    one = choose_devices("manual", [2])
    assert (one.devices, one.strategy, one.env) == (1, "auto", {"CUDA_VISIBLE_DEVICES": "2"})
    with pytest.raises(ValueError, match=r"GPU index 5 is not detected \(visible GPUs: 0, 1, 2, 3\)"):
        choose_devices("manual", [0, 5])
    with pytest.raises(ValueError, match="at least one GPU"):
        choose_devices("manual", [])
    off = choose_devices("off")
    assert (off.devices, off.accelerator, off.env) == (1, "cpu", {"CUDA_VISIBLE_DEVICES": ""})
    # indices are this process's: with CUDA_VISIBLE_DEVICES=4,5,6,7, GPU 1 is physical 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert choose_devices("manual", [1, 2]).env == {"CUDA_VISIBLE_DEVICES": "5,6"}
    with pytest.raises(ValueError, match="device mode 'some'"):
        choose_devices("some")  # type: ignore[arg-type]


@functools.cache
def _compose(*overrides):
    register()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=["paths.output_dir=/nonexistent/run", "paths.cache_dir=/nonexistent/cache", *overrides]
        )


@pytest.mark.parametrize(
    "mode, selected, n, expected",
    [
        ("auto", None, 4, {"accelerator": "gpu", "devices": 4, "strategy": "ddp"}),
        ("auto", None, 1, {"accelerator": "gpu", "devices": 1, "strategy": "auto"}),
        ("manual", [1, 3], 2, {"accelerator": "gpu", "devices": 2, "strategy": "ddp"}),  # the run sees 2 of 4
        ("off", None, 0, {"accelerator": "cpu", "devices": 1, "strategy": "auto"}),
    ],
)
def test_a_choice_is_what_the_run_resolves(gpus, monkeypatch, mode, selected, n, expected):
    """The UI's choice, as the run's process gets it (its overrides on the composed config, the GPUs
    its env leaves visible), resolves to the devices and strategy the choice names."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus(n if mode == "auto" else 4)
    choice = choose_devices(mode, selected)
    assert (choice.devices, choice.strategy, choice.accelerator) == (
        expected["devices"],
        expected["strategy"],
        expected["accelerator"],
    )
    for trainer in ("default", "ddp"):
        cfg = _compose(f"trainer={trainer}", *choice.overrides)
        assert resolve_trainer_devices(cfg.trainer, count=n) == expected
    fsdp = _compose("trainer=fsdp", *choice.overrides)  # a chosen strategy is kept
    assert "strategy" not in resolve_trainer_devices(fsdp.trainer, count=n) and fsdp.trainer.strategy._target_


@pytest.mark.parametrize(
    "group, n, expected",
    [
        ("default", 0, {"accelerator": "cpu", "devices": 1, "strategy": "auto"}),
        ("default", 1, {"accelerator": "gpu", "devices": 1, "strategy": "auto"}),
        ("default", 4, {"accelerator": "gpu", "devices": 4, "strategy": "ddp"}),
        ("ddp", 1, {"accelerator": "gpu", "devices": 1, "strategy": "auto"}),  # one GPU: no DDP
        ("ddp", 4, {"accelerator": "gpu", "devices": 4, "strategy": "ddp"}),
        ("deepspeed", 4, {"accelerator": "gpu", "devices": 4}),  # another strategy is kept
    ],
)
def test_trainer_devices_auto_resolves_before_the_trainer_is_built(gpus, monkeypatch, group, n, expected):
    """The CLI's path: the composed trainer node with devices=auto -> the kwargs build_trainer passes."""
    gpus(n)
    cfg = _compose(f"trainer={group}", "trainer.devices=auto")
    assert resolve_trainer_devices(cfg.trainer) == expected
    seen = {}
    monkeypatch.setattr(train_mod, "_build", lambda node, **kw: seen.update(kw))
    train_mod.build_trainer(cfg, [], [])
    assert {k: seen[k] for k in expected} == expected
    assert resolve_trainer_devices({"devices": 2}) == {}, "an explicit count is left alone"
    assert resolve_trainer_devices({"devices": "auto", "accelerator": "cpu", "strategy": "ddp"}) == {
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
    }


def test_summary_names_the_devices_and_strategy(gpus):
    gpus(0)
    cfg = _compose("trainer.devices=auto")
    built = train_mod.build_trainer(cfg, [], [])
    assert device_summary_rows(built) == [("devices", "1 x cpu [0]"), ("strategy", "single device")]
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    assert device_summary_rows(ddp) == [("devices", "2 x cpu [0, 1]"), ("strategy", "ddp")]


@pytest.mark.parametrize(
    "gib, quantization, optimizer, resolution, extra",
    [
        (80, "none", None, 1024, {}),
        (24, "int8_quanto", None, 1024, {"model.quantization.base_model_default_dtype": "bf16"}),
        (16, "int4_quanto", None, 1024, {"model.quantization.quantize_via": "cpu"}),
        (12, "nf4_bnb", "adamw8bit", 1024, {"trainer.gradient_clip_val": 0.01}),
        (10, "nf4_bnb", "lion8bit_paged", 512, {"model.vae_enable_tiling": True}),
    ],
)
def test_memory_suggestion_follows_the_quickstart_table(gib, quantization, optimizer, resolution, extra):
    hint = memory_suggestion(gib, "krea")
    assert (hint["quantization"], hint["optimizer"], hint["resolution"], hint["fits"]) == (
        quantization,
        optimizer,
        resolution,
        True,
    )
    assert extra.items() <= hint["overrides"].items()
    # every suggestion is made of the project's own option names and keys
    conf = Path(config_dir())
    assert (conf / "quantization" / f"{quantization}.yaml").is_file()
    assert optimizer is None or (conf / "optimizer" / f"{optimizer}.yaml").is_file()
    krea = _compose("model=krea")
    assert all(OmegaConf.select(krea, key, default="<missing>") != "<missing>" for key in hint["overrides"])
    assert not memory_suggestion(8, "krea")["fits"] and not memory_suggestion(0, "dev")["fits"]
    tiny = memory_suggestion(0, "tiny")
    assert (tiny["quantization"], tiny["overrides"], tiny["fits"]) == ("none", {}, True)
