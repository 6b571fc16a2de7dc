"""Small shared pieces for the flavour / quantization / adapter tests (in-memory batches, quick fits)."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from flux_lightning import AdapterConfig, FluxLoRAModule, ModelConfig
from flux_lightning.model.quantization import QuantizationConfig
from flux_lightning.training.flow import TimestepConfig


def _bnb_cpu() -> bool:
    from flux_lightning.model.quantization import bnb_runs_on_cpu

    return torch.cuda.is_available() or bnb_runs_on_cpu()


needs_bnb = pytest.mark.skipif(
    not _bnb_cpu(), reason="this bitsandbytes build cannot quantize/run on the CPU and there is no GPU"
)

REAL_FLAVOURS = ["krea", "dev", "schnell", "kontext", "fluxbooru", "libreflux"]
T5_LEN = 32  # the tiny flavour's T5 length


def batch(seed: int = 0, b: int = 2, *, pad_from: int = 6) -> dict[str, torch.Tensor]:
    """A training batch with the shapes the tiny flavour caches (8x8 latents = 64 px images)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, T5_LEN, dtype=torch.uint8)
    mask[:, :pad_from] = 1
    return {
        "latents": torch.randn(b, 16, 8, 8, generator=g),
        "prompt_embeds": torch.randn(b, T5_LEN, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(b, 32, generator=g),
        "attention_mask": mask,
        "reference_latents": torch.randn(b, 16, 8, 8, generator=g),
    }


class BatchDataset(torch.utils.data.Dataset):
    """``n`` items of :func:`batch`, one sample each."""

    def __init__(self, n: int = 4):
        self.items = [{k: v[0] for k, v in batch(seed=i, b=1, pad_from=4 + i).items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_cfg(cache_root, like: str | None = None, quantization: str = "none", **kw) -> ModelConfig:
    return ModelConfig(
        flavour="tiny",
        tiny_like=like,
        cache_dir=str(cache_root / "models"),
        quantization=QuantizationConfig(base_model_precision=quantization),
        **kw,
    )


def timesteps_for(cfg: ModelConfig) -> TimestepConfig:
    return TimestepConfig(weighting="schnell_fast") if cfg.spec.fast_schedule else TimestepConfig()


def lora(**kw) -> AdapterConfig:
    return AdapterConfig(**{"rank": 4, "dropout": 0.0, "target": "all", **kw})


def lokr(**kw) -> AdapterConfig:
    return AdapterConfig(
        **{
            "type": "lokr",
            "rank": 4,
            "alpha": 1,
            "dropout": 0.0,
            "target": "attention+ff",
            "factor": 4,
            "ff_factor": None,
            **kw,
        }
    )


def trainer(steps: int = 2, **kw) -> L.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return L.Trainer(max_steps=steps, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kw)


def fit(cfg: ModelConfig, adapter: AdapterConfig, *, steps: int = 2, lr: float = 1e-2, seed: int = 0, **trainer_kw):
    """Train ``steps`` steps on in-memory batches with Lightning; returns the module."""
    L.seed_everything(seed, verbose=False)
    module = FluxLoRAModule(cfg, adapter, timesteps_for(cfg), optimizer=partial(torch.optim.AdamW, lr=lr))
    loader = torch.utils.data.DataLoader(BatchDataset(), batch_size=2)
    trainer(steps, **trainer_kw).fit(module, loader)
    return module


@torch.no_grad()
def predict(module: FluxLoRAModule, seed: int = 7) -> torch.Tensor:
    """The module's velocity prediction on a fixed batch (eval mode, its own flavour inputs)."""
    was = module.transformer.training
    module.transformer.eval()
    data = batch(seed)
    try:
        return module(
            data["latents"],
            torch.tensor([0.3, 0.8]),
            data["prompt_embeds"],
            data["pooled_prompt_embeds"],
            **module.conditioning(data),
        )
    finally:
        module.transformer.train(was)
