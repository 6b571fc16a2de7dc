"""The configure wizard: driven through a pseudo-terminal (pexpect), its experiment file trains the tiny
flavour (the config its printed command composes); each of the quickstart's pitfalls is warned about by the
prompt logic (``interview`` with scripted answers, no terminal)."""

from __future__ import annotations

import io
import json
import os
import re
import sys

import pytest

from flux_lightning.data.demo import make_demo_dataset
from flux_lightning.run.hardware import GIB, Accelerator
from flux_lightning.run.train import train
from flux_lightning.wizard.configure import compose_experiment, experiment_problems, interview, write_experiment
from flux_lightning.wizard.plan import Plan, pitfalls

from ..conftest import REPO

pexpect = pytest.importorskip("pexpect", reason="pip install pexpect (the dev extra) to drive the wizard in a terminal")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wizard_in_a_terminal_writes_an_experiment_that_trains(tmp_path, cache_root):
    data = make_demo_dataset(tmp_path / "data", count=6, size=64)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "flux_lightning.wizard", "--config-dir", "my_configs"],
        cwd=str(tmp_path),
        env=env,
        encoding="utf-8",
        timeout=180,
        dimensions=(50, 250),
    )
    answers = [
        ("Experiment name", "wiz"),
        ("Flavour", "tiny"),
        ("GPU memory in GiB", ""),
        ("Quantization", ""),
        ("Dataset folder", str(data)),
        ("Caption strategy", ""),
        ("Trigger phrase", "sks shape"),
        ("Training resolution in px", "100"),  # the pitfall: said, and asked again
        ("Training resolution in px", "64"),
        ("Batch size per GPU", "2"),
        ("Adapter", "lora"),
        ("LoRA rank", "4"),
        ("LoRA alpha", ""),
        ("Optimizer", "adamw"),
        ("Learning rate", ""),
        ("Training steps", "50"),
        ("Validation prompt", "a <token> on white"),
        ("Another validation prompt", "a blue <token>"),
        ("Another validation prompt", ""),
        ("Compile the transformer blocks", ""),
    ]
    child.logfile_read = transcript = io.StringIO()
    for question, answer in answers:
        child.expect_exact(question)
        child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    out = transcript.getvalue()
    assert child.exitstatus == 0, out
    assert "dataset.resolution=100 is not a multiple of 16" in out
    path = tmp_path / "my_configs" / "experiment" / "wiz.yaml"
    text = path.read_text()
    assert text.startswith("# @package _global_\n") and "- override /model: tiny" in text
    command = re.search(r"^\s*(python -m flux_lightning --config-dir \S+ \+experiment=wiz)\s*$", out, re.M).group(1)
    assert command == "python -m flux_lightning --config-dir my_configs +experiment=wiz"
    library = json.loads((tmp_path / "my_configs" / "prompts" / "wiz.json").read_text())
    assert library == {"prompt_2": "a blue <token>"}

    # the printed command's config (the same search path as --config-dir), trained in this process for
    # two steps (a CLI subprocess would import everything again)
    overrides = [
        f"paths.output_dir={tmp_path}/run",
        f"paths.cache_dir={cache_root}",
        "trainer.max_steps=2",
        "callbacks.clip_score=null",
        "callbacks.validation.before_training=false",
        "logger=csv",
    ]
    train(compose_experiment(tmp_path / "my_configs", "wiz", overrides))
    run_dir = tmp_path / "run"
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 2
    assert (result["summary"]["devices"], result["summary"]["strategy"]) == ("1 x cpu [0]", "single device")
    assert sorted(p.name for p in (run_dir / "validation" / "step_2").glob("*.png")) == [
        "prompt_2_64x64.png",
        "validation_64x64.png",
    ]


# -- the prompt logic, scripted ------------------------------------------------------------------
def _scripted(answers: dict[str, object]):
    """``ask`` answering by the question's first words; a list is answered in turn; else the default."""
    asked: list[str] = []

    def ask(question: str, default: str) -> str:
        asked.append(question)
        for start, answer in answers.items():
            if question.startswith(start):
                if isinstance(answer, list):
                    return answer.pop(0) if answer else ""
                return str(answer)
        return ""

    return ask, asked


def _interview(tmp_path, answers, gpus=1, gib=24):
    data = make_demo_dataset(tmp_path / "data", count=3, size=32)
    said: list[str] = []
    ask, asked = _scripted({"Experiment name": "t", "Dataset folder": str(data), **answers})
    accelerators = [Accelerator(i, "GPU", int(gib * GIB)) for i in range(gpus)]
    plan = interview(ask, said.append, accelerators=accelerators)
    warnings = [line.strip().removeprefix("warning: ") for line in said if line.strip().startswith("warning:")]
    return plan, warnings, said, asked


def test_defaults_for_a_24gb_gpu_write_an_experiment_the_library_validates(tmp_path):
    plan, warnings, said, _ = _interview(tmp_path, {"Batch size": "1"})
    assert (plan.flavour, plan.memory_gib, plan.quantization) == ("krea", 24.0, "int8_quanto")
    assert (plan.adapter, plan.optimizer, plan.lr, plan.resolution) == ("lora", "adamw_bf16", 1e-4, 1024)
    assert not warnings, warnings
    write_experiment(plan, tmp_path / "cfg")
    assert experiment_problems(tmp_path / "cfg", "t") == []
    cfg = compose_experiment(tmp_path / "cfg", "t", ["paths.output_dir=out", "paths.cache_dir=cache"])
    assert cfg.model.flavour == "krea" and cfg.model.quantization.base_model_precision == "int8_quanto"
    assert cfg.model.quantization.base_model_default_dtype == "bf16" and cfg.optimizer.name == "adamw_bf16"
    assert cfg.optimizer.lr == 1e-4 and cfg.dataset.instance_data_dir == plan.data_dir
    assert cfg.callbacks.eval_loss is None, "3 images give no eval split: the eval loss is off"


def test_pitfall_lr_that_burns_a_lora(tmp_path):
    _, warnings, _, _ = _interview(tmp_path, {"Learning rate": "1e-3", "Batch size": "1"})
    assert warnings == [
        "optimizer.lr=0.001 will likely burn the LoRA: a 12B Flux wants 0.0001..0.0004 with AdamW (the quickstart: "
        "1e-3 can burn a LoRA entirely); use optimizer.lr=0.0001"
    ]
    plan = Plan(lr=1e-6)
    assert pitfalls(plan) == [
        "optimizer.lr=1e-06 barely moves a LoRA (the quickstart: 1e-5 does almost nothing); use optimizer.lr=0.0001"
    ]
    assert pitfalls(Plan(lr=2e-4, optimizer="optimi_lion")) and not pitfalls(Plan(lr=3e-5, optimizer="optimi_lion"))


def test_pitfall_lokr_lr(tmp_path):
    plan, warnings, _, _ = _interview(tmp_path, {"Adapter": "lokr", "Batch size": "1"})
    assert (plan.optimizer, plan.lr, warnings) == ("adamw", 1e-3, []), "the LoKr default is the quickstart's"
    _, warnings, _, _ = _interview(tmp_path, {"Adapter": "lokr", "Learning rate": "1e-4", "Batch size": "1"})
    assert len(warnings) == 1 and "too low for a LoKr" in warnings[0] and "AdamW 1e-3 and Lion 2e-4" in warnings[0]
    assert not pitfalls(Plan(adapter="lokr", optimizer="optimi_lion", lr=2e-4))


def test_pitfall_nf4_with_compile(tmp_path):
    plan, warnings, _, _ = _interview(tmp_path, {"Compile": "y", "Batch size": "1"}, gib=12)
    assert (plan.quantization, plan.optimizer, plan.compile) == ("nf4_bnb", "adamw8bit", True)
    assert plan.memory_overrides["trainer.gradient_clip_val"] == 0.01
    assert [w for w in warnings if "NF4 does not work with torch.compile" in w] == warnings and len(warnings) == 1


def test_pitfall_resolution_not_a_multiple_of_16(tmp_path):
    plan, _, said, asked = _interview(tmp_path, {"Training resolution": ["1000", "1024"], "Batch size": "1"})
    assert plan.resolution == 1024
    assert [q for q in asked if q.startswith("Training resolution")] == ["Training resolution in px"] * 2
    assert any("dataset.resolution=1000 is not a multiple of 16" in s and "use 1008" in s for s in said)


def test_pitfall_too_few_images_for_the_batch(tmp_path):
    plan, warnings, _, _ = _interview(tmp_path, {"Batch size": "4"})
    assert plan.image_count == 3
    assert len(warnings) == 1 and warnings[0].startswith("3 image(s) in ") and "one batch of 4" in warnings[0]
    # with DDP the batch is per GPU: 2 x 2 GPUs > 3 images
    _, warnings, _, _ = _interview(tmp_path, {"Batch size": "2"}, gpus=2)
    assert len(warnings) == 1 and "one batch of 4 (dataset.batch_size=2 x 2 GPUs)" in warnings[0]


def test_pitfall_quantization_too_large_for_the_gpu(tmp_path):
    _, warnings, _, _ = _interview(tmp_path, {"Quantization": "none", "Batch size": "1"}, gib=16)
    assert len(warnings) == 1 and warnings[0].startswith("quantization=none needs a bit over 30 GB")


def test_lr_advice_follows_the_optimizer_table():
    """The wizard's families are OptimizerSpec.family: every optimizer has one the advice knows."""
    from flux_lightning.training.optim import OPTIMIZER_FAMILIES, OPTIMIZERS
    from flux_lightning.wizard.plan import LR_RANGES, optimizer_family

    for spec in OPTIMIZERS.values():
        assert spec.family in OPTIMIZER_FAMILIES and optimizer_family(spec.name) == spec.family
        if spec.family != "prodigy":
            assert {("lora", spec.family), ("lokr", spec.family)} <= set(LR_RANGES)
    assert [n for n, s in OPTIMIZERS.items() if s.family == "lion"] == ["optimi_lion", "lion8bit_paged"]
