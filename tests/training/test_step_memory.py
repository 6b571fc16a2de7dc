"""What a bf16-mixed step keeps for its backward pass: LoRA layers share their base layer's input."""

from dataclasses import replace

import pytest
import torch

from flux_lightning import AdapterConfig, FluxLoRAModule

from ..support.helpers import batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(module, data, keep_peft_cast: bool):
    """Loss, LoRA gradients and the bytes autograd saved (each storage once, weights excluded)."""
    if keep_peft_cast:
        module.lora_input_casting(True)
        module.lora_input_casting = lambda enabled: None  # PEFT's default: cast every LoRA input
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen, saved = set(), [0]

    def pack(x):
        key = x.untyped_storage().data_ptr()
        if key not in seen and key not in weights:
            seen.add(key)
            saved[0] += x.untyped_storage().nbytes()
        return x

    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = module.training_step(data, 0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.trainable_parameters()], saved[0]


def test_lora_layers_under_autocast_save_no_copy_of_their_input(tiny_model_cfg):
    """fp32 adapter on a bf16 base under bf16 autocast (the GPU default): PEFT's cast of each LoRA
    input to fp32 is undone by autocast, so skipping it gives the same loss and gradients bit for
    bit. (What it saves, one bf16 copy of the input per LoRA layer where layers share an input, shows
    at real width: benchmarks/activation_profile.py, benchmarks/README.md; not at the tiny width.)"""
    cfg = replace(tiny_model_cfg, dtype="bf16")
    data = batch(0, b=2)
    results = []
    for keep in (True, False):
        torch.manual_seed(0)
        module = FluxLoRAModule(cfg, AdapterConfig(rank=4, dropout=0.0, target="all+ffs"))
        module.configure_model()
        results.append(_step(module, data, keep))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert saved_b <= saved_a, (saved_a, saved_b)
    from peft.tuners.lora.layer import LoraLayer

    assert not any(m.cast_input_dtype_enabled for m in module.transformer.modules() if isinstance(m, LoraLayer))


def test_validation_renders_get_peft_input_casting_back(tiny_model_cfg):
    """Pipelines call the transformer directly, maybe without autocast: the cast must be on there."""
    from peft.tuners.lora.layer import LoraLayer

    module = FluxLoRAModule(replace(tiny_model_cfg, dtype="bf16"), AdapterConfig(rank=4, dropout=0.0))
    module.configure_model()
    layers = [m for m in module.transformer.modules() if isinstance(m, LoraLayer)]
    module.lora_input_casting(False)
    assert not any(m.cast_input_dtype_enabled for m in layers)
    with module.inference_adapters():
        assert all(m.cast_input_dtype_enabled for m in layers)
    data = batch(0, b=1)
    module.training_step(data, 0)  # no autocast: PEFT's cast stays on (fp32 adapter, bf16 base)
    assert all(m.cast_input_dtype_enabled for m in layers)
