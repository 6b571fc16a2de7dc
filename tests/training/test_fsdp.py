"""Sharded strategies as far as a CPU takes them.

Lightning refuses FSDP on a CPU accelerator and DeepSpeed needs CUDA, so: the per-block FSDP wrap
and the gathered LoRA export run under PyTorch's FSDP directly (2 CPU processes, gloo) and are
compared with one process; the strategy built by ``trainer=fsdp``, resume from checkpoint
directories (FSDP sharded, DeepSpeed) and the error without DeepSpeed are checked here; training
through Lightning with these strategies is left to benchmarks/gpu_multi.py on a GPU machine.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ..conftest import REPO
from ..support.numerics import beyond_rounding


def _script(rank, world, init, cache, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        str(REPO / "tests" / "support" / "fsdp_cpu_script.py"),
        str(rank),
        str(world),
        str(init),
        str(cache),
        str(out),
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_shards_per_flux_block_and_exports_the_single_process_lora(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _wait(_script(0, 1, tmp_path / "init1", tmp_path / "models", one))
    procs = [_script(r, 2, tmp_path / "init2", tmp_path / "models", two) for r in (0, 1)]
    for p in procs:
        _wait(p)
    reports = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    reference = json.loads((one / "rank0.json").read_text())
    for rep in reports:
        # the tiny Flux has 2 double and 2 single blocks: one unit each, plus the transformer's own
        assert sorted(rep["units"]) == sorted(
            ["FluxTransformer2DModel"] + ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2
        )
        assert rep["local_numel"] * 2 == rep["total_numel"]  # each rank holds half
        assert rep["gathered_numel"] == rep["total_numel"] == reference["total_numel"]
        assert rep["trainable"] == reference["trainable"] > 0  # LoRA tensors stay trainable parameters
    single = load_file(one / "pytorch_lora_weights.safetensors")
    sharded = load_file(two / "pytorch_lora_weights.safetensors")
    assert single.keys() == sharded.keys() and len(single) == reference["trainable"]
    assert any(single[k].abs().max() > 0 for k in single if "lora_B" in k), "training did not move the adapter"
    # the same update on a batch of 2, split or not: the reduction order differs, so an element whose gradient
    # is near zero may take its AdamW step with the other sign (seen under ATEN_CPU_CAPABILITY=default)
    assert beyond_rounding(sharded, single) is None, beyond_rounding(sharded, single)


def test_trainer_fsdp_builds_a_per_block_wrap_policy_with_trainable_lora():
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformer2DModel,
        FluxTransformerBlock,
    )
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    from flux_lightning.config.schema import config_dir, register

    register()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {FluxTransformerBlock, FluxSingleTransformerBlock, FluxTransformer2DModel}
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "full"


def test_resume_finds_fsdp_and_deepspeed_checkpoint_directories(tmp_path):
    from flux_lightning.run.resume import checkpoint_step, resolve_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    older = ckpts / "step000004.ckpt"
    torch.save({"global_step": 4, "state_dict": {}}, older)
    assert resolve_checkpoint("latest", str(tmp_path)) == str(older)
    # FSDP state_dict_type=sharded: a folder with the shards and meta.pt (Lightning's layout)
    fsdp = ckpts / "step000008.ckpt"
    fsdp.mkdir()
    (fsdp / "__0_0.distcp").write_bytes(b"shard")
    torch.save({"global_step": 8, "epoch": 0}, fsdp / "meta.pt")
    assert resolve_checkpoint("latest", str(tmp_path)) == str(fsdp)
    assert checkpoint_step(fsdp) == 8
    # DeepSpeed: <dir>/latest names the tag; <tag>/mp_rank_00_model_states.pt holds the client state
    ds = ckpts / "last.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    torch.save({"module": {}, "global_step": 12, "epoch": 1}, ds / "checkpoint" / "mp_rank_00_model_states.pt")
    os.utime(older, (1, 1))
    assert resolve_checkpoint("latest", str(tmp_path)) == str(ds)
    assert checkpoint_step(ds) == 12
    assert resolve_checkpoint(str(fsdp), str(tmp_path)) == str(fsdp)  # an explicit folder too
    # a folder that is neither is skipped like an unreadable file
    (ds / "checkpoint" / "mp_rank_00_model_states.pt").unlink()
    assert resolve_checkpoint("latest", str(tmp_path)) == str(fsdp)


def test_deepspeed_without_the_package_is_one_line_naming_the_install(monkeypatch):
    import importlib.util

    from flux_lightning.config.run_checks import trainer_problems

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    problems = trainer_problems({"strategy": "deepspeed_stage_2", "max_steps": 10})
    assert problems == [
        "trainer.strategy=deepspeed_stage_2: DeepSpeed is not installed; pip install deepspeed (Linux with CUDA), "
        "or use trainer=fsdp (PyTorch's own sharding) or trainer=ddp"
    ]
    assert trainer_problems({"strategy": "ddp", "max_steps": 10}) == []
    assert (
        trainer_problems({"strategy": {"_target_": "flux_lightning.training.strategies.fsdp"}, "max_steps": 10}) == []
    )


def test_gpu_multi_benchmark_says_it_needs_two_gpus_on_a_cpu_machine():
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("a multi-GPU machine runs the benchmark itself")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_multi.py"), "--preset", "small"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "benchmarks/gpu_multi.py needs a machine with at least 2 CUDA GPUs"
