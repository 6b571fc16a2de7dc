"""Shared fixtures: everything is built locally (tiny Flux, generated images); nothing is downloaded."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs on two workers (pyproject addopts) on two cores: one thread per process, here and in
# every CLI subprocess a test starts (the tiny model's matmuls are fastest single-threaded anyway).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from flux_lightning import AdapterConfig, DatasetConfig, FluxDataModule, FluxLoRAModule, ModelConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls are fastest single-threaded (and do not fight other processes for cores);
    modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One cache dir for the session: the tiny model folder and demo data are built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_model_cfg(cache_root) -> ModelConfig:
    return ModelConfig(flavour="tiny", cache_dir=str(cache_root / "models"))


@pytest.fixture(scope="session")
def tiny_folder(tiny_model_cfg) -> Path:
    from flux_lightning.model.components import resolve_source

    return Path(resolve_source(tiny_model_cfg))


def make_datamodule(model_cfg: ModelConfig, cache_root: Path, **overrides) -> FluxDataModule:
    cfg = dict(resolution=64, batch_size=2, cache_dir=str(cache_root), caption_dropout_probability=0.0)
    cfg.update(overrides)
    prompts = cfg.pop("prompts", ())
    return FluxDataModule(DatasetConfig(**cfg), model_cfg, prompts=prompts)


def fit_tiny(model_cfg, cache_root, *, steps=4, adapter=None, lr=1e-3, seed=0, callbacks=(), **data):
    """Train the tiny flavour for ``steps`` steps on the demo data; returns (module, datamodule)."""
    L.seed_everything(seed)
    dm = make_datamodule(model_cfg, cache_root, **data)
    module = FluxLoRAModule(
        model_cfg,
        adapter or AdapterConfig(rank=4, dropout=0.0),
        optimizer=partial(torch.optim.AdamW, lr=lr),
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, dm)
    return module, dm


# Test files that compare numbers from different code paths (ours vs diffusers', with vs without a memory
# feature, a file recorded on another machine): `.ci/run` runs them again under each forced CPU capability
# this machine is not using (`ATEN_CPU_CAPABILITY=default|avx2`), so another machine's kernels are tried here.
TESTS = Path(__file__).resolve().parent
NUMERICS = {
    "e2e/test_defaults_unchanged.py",
    "training/test_flow.py",
    "training/test_timestep_schemes.py",
    "model/test_tread.py",
    "training/test_rollout.py",
    "model/test_memory.py",
    "adapters/test_dora.py",
    "callbacks/test_ema.py",
    "lora_tools/test_lora_tools.py",
    "training/test_module.py",
    "adapters/test_lora_layouts.py",
    "callbacks/test_adapter_export.py",
    "adapters/test_lokr_and_init.py",
    "callbacks/test_eval_loss.py",
    "training/test_nonfinite.py",
    "model/test_quantization.py",
    "callbacks/test_validation.py",
    "model/test_compile.py",
    "callbacks/test_preview.py",
    "model/test_flavours.py",
    "adapters/test_adapters.py",
    "training/test_fsdp.py",
}


def pytest_collection_modifyitems(config, items):
    missing = sorted(f for f in NUMERICS if not (TESTS / f).is_file())
    if missing:  # a moved or renamed file would silently leave the forced-capability runs
        raise pytest.UsageError(f"tests/conftest.py NUMERICS names files that do not exist: {missing}")
    for item in items:
        if item.path.relative_to(TESTS).as_posix() in NUMERICS:
            item.add_marker(pytest.mark.numerics)
