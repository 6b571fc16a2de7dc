"""Optimizers, LR schedulers, gradient clipping and accumulation, interval gradient checkpointing."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from flux_lightning import FluxLoRAModule
from flux_lightning.config.validation import validate
from flux_lightning.model.memory import checkpointed_blocks
from flux_lightning.run.train import config_dir
from flux_lightning.training.optim import OPTIMIZERS, adapter_dtype, build_optimizer

from ..support.helpers import BatchDataset, batch, lora, needs_bnb, timesteps_for, tiny_cfg, trainer

OPTIMIZER_FILES = sorted(p.stem for p in (Path(config_dir()) / "optimizer").glob("*.yaml"))
SCHEDULER_FILES = sorted(p.stem for p in (Path(config_dir()) / "lr_scheduler").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", *overrides]
        )


def test_every_optimizer_has_a_config_and_the_quickstart_ones_exist():
    assert set(OPTIMIZER_FILES) == set(OPTIMIZERS)
    assert {
        "adamw",
        "adamw_bf16",
        "optimi_lion",
        "optimi_stableadamw",
        "adamw8bit",
        "lion8bit_paged",
        "prodigy",
    } <= set(OPTIMIZERS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_bnb) if "8bit" in n else n for n in OPTIMIZER_FILES])
def test_optimizer_config_builds_and_steps_adapter_weights(tmp_path, name):
    cfg = _compose(tmp_path, f"optimizer={name}")
    run = validate(cfg, check_sources=False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[run.adapter.weight_dtype]
    assert run.adapter.weight_dtype == adapter_dtype(name)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64).to(dtype)), torch.nn.Parameter(torch.randn(64).to(dtype))]
    before = [p.detach().clone() for p in params]
    optimizer = instantiate(cfg.optimizer)(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(params, before)), f"{name} did not move the weights"
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in params)
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")  # resumable: plain types only
    torch.load(tmp_path / "opt.pt", weights_only=True)


def test_adamw_bf16_holds_the_adapter_in_bf16_with_kahan_compensation(tmp_path, cache_root):
    run = validate(_compose(tmp_path, "optimizer=adamw_bf16"), check_sources=False)
    module = FluxLoRAModule(tiny_cfg(cache_root, "krea"), replace(run.adapter, rank=4))
    module.configure_model()
    assert {p.dtype for p in module.trainable_parameters()} == {torch.bfloat16}
    # Kahan summation: updates far below bf16's resolution at 1.0 still accumulate
    moved = {}
    for kahan in (True, False):
        p = torch.nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
        opt = build_optimizer([p], "adamw_bf16", lr=1e-4, weight_decay=0.0, kahan_sum=kahan)
        for _ in range(200):
            p.grad = torch.ones_like(p)
            opt.step()
        moved[kahan] = (1.0 - p.float()).mean().item()
        assert (opt.state[p].get("kahan_comp") is not None) == kahan
    # 200 steps of 1e-4 = 0.02, exact to within bf16's spacing below 1.0 (2^-8); plain bf16 rounds every step away
    assert moved[True] == pytest.approx(200 * 1e-4, abs=2**-8) and moved[False] < 1e-6


@pytest.mark.parametrize("name", SCHEDULER_FILES)
def test_lr_scheduler_config_builds_and_steps(tmp_path, name):
    cfg = _compose(tmp_path, f"lr_scheduler={name}")
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([p], lr=1.0)
    scheduler = instantiate(cfg.lr_scheduler)(optimizer=optimizer, num_training_steps=300)
    lrs = []
    for _ in range(300):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    if name == "constant":
        assert set(lrs) == {1.0}
    else:
        warmup = cfg.lr_scheduler.num_warmup_steps
        assert lrs[warmup // 2] < lrs[warmup], "no warmup"
    if name in ("linear", "cosine", "polynomial"):
        assert lrs[-1] < 0.05


class Recording(torch.optim.SGD):
    """SGD that records, at every step, the gradients it was given (after any clipping)."""

    def __init__(self, params, **kw):
        super().__init__(params, lr=1e-3, **kw)
        self.seen = []

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.seen.append(
            [p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        )
        super().step()
        return loss


def _fit_recording(cache_root, steps=1, **trainer_kw):
    cfg = tiny_cfg(cache_root, "krea", gradient_checkpointing=False)
    module = FluxLoRAModule(cfg, lora(init="gaussian"), timesteps_for(cfg), optimizer=Recording)
    t = trainer(steps, **trainer_kw)
    t.fit(module, torch.utils.data.DataLoader(BatchDataset(8), batch_size=1))
    return t.optimizers[0], t


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_by_norm_and_by_value(cache_root, algorithm):
    optimizer, _ = _fit_recording(cache_root, gradient_clip_val=1e-4, gradient_clip_algorithm=algorithm)
    grads = optimizer.seen[0]
    if algorithm == "norm":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert total == pytest.approx(1e-4, rel=1e-3)
    else:
        assert max(g.abs().max().item() for g in grads) <= 1e-4 + 1e-12
        assert sum(torch.isclose(g.abs(), torch.tensor(1e-4)).sum().item() for g in grads) > 0


def test_gradient_accumulation_steps_once_per_n_batches(cache_root):
    optimizer, t = _fit_recording(cache_root, steps=2, accumulate_grad_batches=3)
    assert len(optimizer.seen) == 2 and t.global_step == 2
    assert t.fit_loop.epoch_loop.batch_progress.total.completed == 6


@pytest.mark.parametrize("interval", [2, 3])
def test_checkpointing_every_nth_block_gives_the_same_gradients(cache_root, interval, monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kw):
        calls.append(fn)
        return original(fn, *args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    grads = {}
    for name, kw in {
        "off": dict(gradient_checkpointing=False),
        "every": dict(gradient_checkpointing_interval=interval),
    }.items():
        torch.manual_seed(3)
        module = FluxLoRAModule(tiny_cfg(cache_root, "krea", **kw), lora(init="gaussian"))
        module.configure_model()
        torch.manual_seed(0)
        module.training_step(batch(), 0).backward()
        grads[name] = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    for k in grads["off"]:
        torch.testing.assert_close(grads["every"][k], grads["off"][k], atol=1e-6, rtol=1e-5)
    blocks = checkpointed_blocks(module.transformer, interval)
    assert len(calls) == len(blocks) == len(range(0, 4, interval))  # 2 double + 2 single tiny blocks


def test_prodigy_with_an_adamw_learning_rate_warns(caplog):
    p = torch.nn.Parameter(torch.zeros(2))
    with caplog.at_level("WARNING"):
        build_optimizer([p], "prodigy", lr=1e-4)
    assert "expects lr ~ 1.0" in caplog.text


def test_torch_adamw_is_fused_by_default_and_updates_like_the_loop():
    """``optimizer=adamw`` runs torch's fused kernel where torch has one (CPU here): the same
    update as torch's per-tensor loop (several times faster on the many small LoRA tensors);
    ``optimizer.fused=false`` keeps torch's default."""
    from flux_lightning.training.optim import build_optimizer

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 32), (64, 4)] * 6
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    results = {}
    for fused in (None, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = build_optimizer(params, "adamw", lr=1e-2, fused=fused)
        results[fused] = (opt, params)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
    assert results[None][0].defaults["fused"] is True and not results[False][0].defaults["fused"]
    for a, b in zip(results[None][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
