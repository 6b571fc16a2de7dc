"""The defaults reproduce the LoRA trained before issue 15's options (rollout, EMA, DoRA, weighting
schemes, loss types, alpha masks) existed: every new option's default must leave the step as it was.

`tests/data/demo_lora_4_steps_<capability>_<vendor>.safetensors` are fp32 exports of
`python -m flux_lightning` with the overrides below, trained single-threaded (metadata: the commit, torch's
CPU capability, the CPU vendor and torch's version): AVX512 on an Intel machine at commit 8567c22; AVX512,
AVX2 and DEFAULT (`ATEN_CPU_CAPABILITY=...`) on an AMD machine (Zen 4) at later commits that train the same
steps (bit for bit with 8567c22 on the Intel machine, and within the bound below here). MKL takes another path
on another vendor's CPU, so the vendor is part of the key: AVX512 on AMD and on Intel differ too. Regenerate them only when a change of the training math is intended.

Where this machine runs the kernels that recorded a file (same capability, vendor and torch), the run must
equal it bit for bit. Every file is also compared with a bound that holds across kernels: kernels of another
SIMD width (or MKL's path for another vendor) sum in another order, and after 4 AdamW steps an element whose
gradient is near zero can take its step with the other sign (lr = 1e-3: differences up to 1e-3 in a few
elements), while a real change of the run moves most elements. Measured between the four files: at most
1.7% of the elements differ beyond rounding (atol 1e-6, rtol 1e-5) and the relative L2 distance is at
most 3.0e-4; a learning rate 1% higher moves 53% of the elements (L2 1.5e-3), one more step 93%,
another seed 99.7%. The bounds sit in between (`test_the_bound_catches_a_one_percent_learning_rate_change`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file

from flux_lightning.config.schema import config_dir
from flux_lightning.run.train import train

from ..support.numerics import MAX_MOVED_FRACTION, MAX_RELATIVE_L2, beyond_rounding  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = sorted((Path(__file__).parent / "data").glob("demo_lora_4_steps_*.safetensors"))


def cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def same_kernels(recorded: dict[str, str]) -> bool:
    return (recorded.get("cpu_capability"), recorded.get("cpu_vendor"), recorded.get("torch")) == (
        torch.backends.cpu.get_cpu_capability(),
        cpu_vendor(),
        torch.__version__,
    )


def default_run(tmp_path: Path, *extra: str) -> dict[str, torch.Tensor]:
    overrides = [
        f"paths.output_dir={tmp_path}/run",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_steps=4",
        "callbacks.validation=null",
        "logger=csv",
        "callbacks.adapter_export.dtype=fp32",
        *extra,
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        train(compose("train", overrides=overrides))
    return load_file(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")


def recorded_runs() -> list[tuple[str, dict[str, str], dict[str, torch.Tensor]]]:
    assert len(GOLDEN) >= 4, GOLDEN
    runs = []
    for path in GOLDEN:
        with safe_open(path, "pt") as f:
            runs.append((path.name, f.metadata(), load_file(path)))
    return runs


def test_default_run_reproduces_the_lora_from_before_the_new_options(tmp_path):
    now = default_run(tmp_path)
    for name, meta, recorded in recorded_runs():
        if same_kernels(meta):  # the kernels that wrote the file: bit for bit
            changed = [k for k in recorded if not torch.equal(now[k], recorded[k])]
            assert not changed, (
                f"the default run's LoRA changed bit for bit from {name} in {len(changed)} tensors, e.g. {changed[:3]}"
            )
        reason = beyond_rounding(now, recorded)
        assert reason is None, f"the default run's LoRA is not {name} up to rounding: {reason}"


def test_the_recorded_runs_agree_within_the_bound():
    """The spread the bound must cover: the same run on four kernel sets."""
    runs = recorded_runs()
    for i, (a, _, x) in enumerate(runs):
        for b, _, y in runs[i + 1 :]:
            assert beyond_rounding(x, y) is None, (a, b, beyond_rounding(x, y))
            assert any(not torch.equal(x[k], y[k]) for k in x), (a, b)  # they do differ: the bound is needed


def test_the_bound_catches_a_one_percent_learning_rate_change(tmp_path):
    now = default_run(tmp_path, "optimizer.lr=0.00101")  # the demo's 1e-3, 1% higher
    for name, _, recorded in recorded_runs():
        assert beyond_rounding(now, recorded) is not None, name
