"""Every flavour x {none, int8, int4 quanto} x {LoRA, LoKr}: trains, exports, and loads back.

The tiny flavour mimics each real flavour (``model.tiny_like``): guidance embedding on/off,
attention-masked training (libreflux), the fast schedule (schnell) and kontext's reference tokens.
Each case trains 2 Lightning steps, exports, and the file is read back twice: by this library into a
freshly built (and equally quantized) model, whose predictions must match the trained module, and
by the outside loader of its format (diffusers for LoRA, LyCORIS for LoKr) on an unquantized base.
"""

from dataclasses import replace

import pytest
import torch
from lycoris import create_lycoris_from_weights
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from flux_lightning import FluxLoRAModule
from flux_lightning.model.components import load_transformer
from flux_lightning.model.quantization import QuantizationConfig

from ..support.helpers import REAL_FLAVOURS, fit, lokr, lora, predict, timesteps_for, tiny_cfg

QUANTIZATIONS = ["none", "int8_quanto", "int4_quanto"]
ADAPTERS = {"lora": lora, "lokr": lokr}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("flavour", REAL_FLAVOURS)
def test_flavour_trains_exports_and_loads_back(cache_root, tmp_path, flavour, quantization, adapter):
    cfg = tiny_cfg(cache_root, flavour, quantization, gradient_checkpointing=False)
    adapter_cfg = ADAPTERS[adapter]()
    module = fit(cfg, adapter_cfg)
    assert module.global_step == 2
    trained = module.state_dict()
    assert trained and all(torch.isfinite(v).all() for v in trained.values())

    path = module.export_adapter(tmp_path, dtype=torch.float32)
    exported = load_file(path)
    assert exported and not any("base_layer" in k or k.endswith(".weight._data") for k in exported)

    # 1. our own loader, into a fresh model built the same way (quantized alike)
    reloaded = FluxLoRAModule(cfg, replace(adapter_cfg, init_lora=str(path)), timesteps_for(cfg))
    reloaded.configure_model()
    torch.testing.assert_close(predict(reloaded), predict(module), atol=1e-5, rtol=1e-5)

    # 2. the format's own loader, on the unquantized base
    fresh = load_transformer(replace(cfg, quantization=QuantizationConfig()))
    if adapter == "lora":
        fresh.load_lora_adapter(str(path), prefix="transformer", adapter_name="loaded")
        loaded = get_peft_model_state_dict(fresh, adapter_name="loaded")
        assert {f"transformer.{k}" for k in loaded} == set(exported)
        for key, value in loaded.items():
            torch.testing.assert_close(value, exported[f"transformer.{key}"])
    else:
        network, _ = create_lycoris_from_weights(1.0, str(path), fresh)
        network.apply_to()
        assert {k for k in network.state_dict()} == set(exported)
        for key, value in network.state_dict().items():
            if ".lokr_" in key:  # (alpha is irrelevant with full-matrix factors: LyCORIS rewrites it)
                torch.testing.assert_close(value.float(), exported[key].float())
    if quantization == "none":  # same base: the outside loader must reproduce the trained model
        outside = FluxLoRAModule(cfg, adapter_cfg, timesteps_for(cfg))
        outside.transformer = fresh
        torch.testing.assert_close(predict(outside), predict(module), atol=1e-5, rtol=1e-5)
