"""The non-finite guard: NaN/inf never reaches the adapter weights, bad steps are skipped and counted,
K bad steps in a row stop the run, and healthy steps are bit-identical to Lightning's plain step."""

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.callbacks import AdapterExport
from flux_lightning.training.guard import NonFiniteLossError

from ..support.helpers import batch

pytestmark = pytest.mark.usefixtures("one_thread")


def items(n: int, bad: set[int] = frozenset()) -> list[dict]:
    """``n`` samples; those in ``bad`` have NaN latents (a damaged cache entry)."""
    out = []
    for i in range(n):
        b = batch(seed=i, b=1)
        sample = {k: b[k][0] for k in ("latents", "prompt_embeds", "pooled_prompt_embeds")}
        if i in bad:
            sample["latents"] = torch.full_like(sample["latents"], float("nan"))
        out.append(sample)
    return out


class PlainStep(FluxLoRAModule):
    """Lightning's own optimizer step (no guard); the update of batch ``skip`` is left out by hand:
    its forward/backward run, then its gradients are dropped (the next step zeroes them)."""

    skip: int | None = None

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if batch_idx == self.skip:
            optimizer_closure()
            return
        L.LightningModule.optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure)


OPTIMIZERS = {
    "torch_adamw": partial(torch.optim.AdamW, lr=1e-2),
    "optimi_adamw": partial(
        __import__("flux_lightning.training.optim", fromlist=["x"]).build_optimizer, name="adamw", lr=1e-2
    ),
}


def run(
    cfg, data, *, steps, cls=FluxLoRAModule, optimizer="torch_adamw", skip=None, callbacks=(), host_decides=None, **kw
):
    L.seed_everything(0, verbose=False)
    module = cls(cfg, AdapterConfig(rank=4, dropout=0.0), optimizer=OPTIMIZERS[optimizer], **kw)
    module.skip = skip
    module.nonfinite.host_decides = host_decides
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        gradient_clip_val=1.0,
        log_every_n_steps=1,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    return module, trainer


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_healthy_steps_are_bit_identical_to_lightnings_plain_step(tiny_model_cfg):
    guarded, _ = run(tiny_model_cfg, items(8), steps=4)
    plain, _ = run(tiny_model_cfg, items(8), steps=4, cls=PlainStep)
    assert same(weights(guarded), weights(plain))
    assert guarded.skipped_nonfinite_steps() == 0


@pytest.mark.parametrize("host_decides", [True, False], ids=["cpu_host_read", "device_select"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad_batch", [0, 1])  # 0: the first step (the optimizer has no state yet)
def test_one_bad_batch_is_skipped_and_training_continues_bit_identically(
    tiny_model_cfg, bad_batch, optimizer, host_decides
):
    """Compared: the adapter weights and the whole optimizer state after 4 steps, against Lightning's
    plain step on the same data with the bad batch's update left out by hand (same noise draws for
    every other batch, gradient clipping on in both). Both ways of applying the decision: read on the
    host (the CPU's) and selected on the device (an accelerator's, forced here on the CPU)."""
    bad = {2 * bad_batch, 2 * bad_batch + 1}
    guarded, t1 = run(tiny_model_cfg, items(8, bad), steps=4, optimizer=optimizer, host_decides=host_decides)
    plain, t2 = run(tiny_model_cfg, items(8, bad), steps=4, optimizer=optimizer, cls=PlainStep, skip=bad_batch)
    assert same(weights(guarded), weights(plain))
    assert all(v.isfinite().all() for v in weights(guarded).values())
    s1, s2 = t1.optimizers[0].state_dict(), t2.optimizers[0].state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][name])), (k, name)
    assert [{k: v for k, v in g.items() if k != "params"} for g in s1["param_groups"]] == [
        {k: v for k, v in g.items() if k != "params"} for g in s2["param_groups"]
    ]
    assert guarded.skipped_nonfinite_steps() == 1
    assert float(t1.callback_metrics["train/skipped_nonfinite"]) == 1.0
    assert guarded.recent_train_loss() == guarded.recent_train_loss()  # the NaN loss is left out


def test_k_bad_steps_in_a_row_stop_the_run_keeping_the_last_good_state(tiny_model_cfg, tmp_path):
    """Steps 1-2 train on good data, then every latent is NaN: with K=3 the run stops at step 5;
    weights, last.ckpt and the LoRA file all hold the state after step 2, and nothing is NaN."""
    data = items(12, bad=set(range(4, 12)))
    good, _ = run(tiny_model_cfg, data, steps=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    export = AdapterExport(str(tmp_path / "lora"), dtype="fp32")
    with pytest.raises(NonFiniteLossError) as info:
        run(tiny_model_cfg, data, steps=10, callbacks=[ckpt, export], nonfinite_max_consecutive=3)
    message = str(info.value)
    assert "training stopped at step 5" in message and "from step 3" in message
    assert "cached latents or text embeddings" in message and "re-run" in message
    assert not (tmp_path / "ckpt" / "step=5.ckpt").exists() and not list((tmp_path / "ckpt").glob("*step=5*"))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert same(last["state_dict"], weights(good))
    assert all(int(s["step"]) == 2 for s in last["optimizer_states"][0]["state"].values())
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(t.isfinite().all() for t in lora.values())


def test_diverging_loss_names_the_learning_rate(tiny_model_cfg):
    module = FluxLoRAModule(tiny_model_cfg, nonfinite_max_consecutive=2)
    guard = module.nonfinite
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    for _ in range(2):
        guard.observe(torch.tensor(float("inf")), [torch.ones(2)])
        p.grad = torch.full((3,), float("inf"))
        guard.step(opt, opt.step)
    assert torch.equal(p.detach(), torch.ones(3))
    with pytest.raises(NonFiniteLossError, match="the loss diverged: lower optimizer.lr or train in bf16"):
        guard.check(7, precision="16-mixed")


def test_export_refuses_non_finite_weights(tiny_model_cfg, tmp_path):
    module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=4))
    module.configure_model()
    with torch.no_grad():
        module.trainable_parameters()[0].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/inf; refusing"):
        module.export_adapter(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_damaged_latent_cache_stops_the_cli_run_with_one_line_and_exit_3(tmp_path, monkeypatch, capsys):
    """A damaged cache end to end: every cached latent reads back as NaN. The run skips every step,
    stops at the first check after K=4 bad steps with one line naming the step and the damaged cache,
    exits 3, and leaves only finite files behind (last.ckpt = the step-2 checkpoint)."""
    import sys

    from safetensors.torch import load_file

    from flux_lightning.data.cache import TensorCache
    from flux_lightning.run.train import main

    load = TensorCache.load

    def damaged(self, key, *args, **kwargs):
        out = load(self, key, *args, **kwargs)
        if "latents" in out:
            out["latents"] = torch.full_like(out["latents"], float("nan"))
        return out

    monkeypatch.setattr(TensorCache, "load", damaged)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "flux_lightning",
            f"hydra.run.dir={run_dir}",
            f"paths.output_dir={run_dir}",
            f"paths.cache_dir={tmp_path}/cache",
            "trainer.max_steps=20",
            "trainer.log_every_n_steps=2",
            "nonfinite_max_consecutive=4",
            "adapter.rank=4",
            "callbacks.validation=null",
            "callbacks.clip_score=null",
            "callbacks.eval_loss=null",
            "logger=csv",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "+trainer.enable_progress_bar=false",
        ],
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 3
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "training stopped at step 4" in errors[0] and "cache is damaged" in errors[0]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step000002.ckpt"], ckpts
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and all(v.isfinite().all() for v in last["state_dict"].values())
    lora = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert all(t.isfinite().all() for t in lora.values())
    assert "train/skipped_nonfinite" in (run_dir / "csv" / "metrics.csv").read_text()
