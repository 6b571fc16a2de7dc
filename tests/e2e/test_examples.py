"""The examples run as documented (shortened)."""

import importlib.util
import math

from ..conftest import REPO


def test_dreambooth_example_trains_with_the_instance_prompt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("ex", REPO / "examples" / "dreambooth" / "train_tiny_dreambooth.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    loss = example.main(["trainer.max_steps=2", "callbacks.validation.before_training=false"])
    run = tmp_path / "outputs" / "examples" / "dreambooth" / "run"
    assert math.isfinite(loss)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "validation" / "step_2" / "validation_64x64.png").is_file()
