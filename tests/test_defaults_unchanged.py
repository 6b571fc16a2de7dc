"""The defaults reproduce the LoRA trained before issue 15's options (rollout, EMA, DoRA, weighting
schemes, loss types, alpha masks) existed: every new option's default must leave the step as it was.

`tests/data/demo_lora_4_steps_8567c22.safetensors` is the fp32 export of `python -m flux_lightning`
with the overrides below, trained single-threaded at commit 8567c22 (metadata: the commit, torch's
CPU capability and version). Regenerate it only when a change of the training math is intended.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file

from flux_lightning.schema import config_dir
from flux_lightning.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

BEFORE = Path(__file__).parent / "data" / "demo_lora_4_steps_8567c22.safetensors"


def test_default_run_reproduces_the_lora_from_before_the_new_options(tmp_path):
    overrides = [
        f"paths.output_dir={tmp_path}/run",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_steps=4",
        "callbacks.validation=null",
        "logger=csv",
        "callbacks.adapter_export.dtype=fp32",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        train(compose("train", overrides=overrides))
    now = load_file(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
    before = load_file(BEFORE)
    assert sorted(now) == sorted(before)
    with safe_open(BEFORE, "pt") as f:
        recorded = f.metadata()
    if recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability():
        changed = [k for k in before if not torch.equal(now[k], before[k])]
        assert not changed, f"the default run's LoRA changed bit for bit in {len(changed)} tensors, e.g. {changed[:3]}"
    else:  # other SIMD kernels sum in another order: equal up to float rounding
        for k in before:
            torch.testing.assert_close(now[k], before[k], rtol=1e-5, atol=1e-6)
