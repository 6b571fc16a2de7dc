"""Memory features that run on a CPU: group offload mechanics (CPU to CPU, spilled to disk) inside a
real Lightning fit, VAE tiling, the attention backend switch, model CPU offload of the helper models.
(The CUDA-only paths are validated in test_config_combinations.)"""

import tempfile
from dataclasses import replace

import lightning as L
import pytest
import torch

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.callbacks import ValidationImages
from flux_lightning.model.components import (
    attention_backend_problem,
    load_transformer,
    load_vae,
    model_identity,
    set_attention_backend,
)
from flux_lightning.model.memory import apply_group_offload, offloadable_layers
from flux_lightning.training.flow import TimestepConfig

from ..conftest import fit_tiny
from ..support.helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([1.0]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )


@torch.no_grad()
def test_group_offload_to_disk_keeps_the_outputs(cache_root, tmp_path):
    cfg = tiny_cfg(cache_root, "krea", enable_group_offload=True, group_offload_to_disk_path=str(tmp_path / "spill"))
    t = load_transformer(cfg)
    before = t(**_inputs())[0]
    apply_group_offload(t, cfg, torch.device("cpu"))
    assert list((tmp_path / "spill").glob("*.safetensors")), "nothing was spilled to disk"
    torch.testing.assert_close(t(**_inputs())[0], before, atol=1e-6, rtol=1e-6)


def test_vae_tiling_is_applied_and_keys_the_latent_cache(cache_root):
    cfg = tiny_cfg(cache_root, "krea")
    tiled = replace(cfg, vae_enable_tiling=True)
    assert load_vae(tiled).use_tiling and not load_vae(cfg).use_tiling
    assert model_identity(tiled, "vae") != model_identity(cfg, "vae")
    assert model_identity(tiled, "text") == model_identity(cfg, "text")


@torch.no_grad()
def test_attention_backend_switch_reaches_the_processors(cache_root):
    t = load_transformer(tiny_cfg(cache_root, "krea"))
    sdpa = t(**_inputs())[0]
    set_attention_backend(t, "flex")  # PyTorch's flex attention runs (forward only) on a CPU
    assert str(t.transformer_blocks[0].attn.processor._attention_backend.value) == "flex"
    torch.testing.assert_close(t(**_inputs())[0], sdpa, atol=1e-5, rtol=1e-5)


def test_missing_attention_packages_give_an_install_hint():
    import importlib.util

    if importlib.util.find_spec("sageattention") is not None:
        pytest.skip("sageattention is installed here")
    message = attention_backend_problem("sageattention")
    assert "pip install sageattention" in message and "model.attention_backend=sdpa" in message
    with pytest.raises(RuntimeError, match="needs the sageattention package"):
        set_attention_backend(torch.nn.Module(), "sageattention")


def test_choosing_a_backend_does_not_leak_into_other_models(cache_root):
    first = load_transformer(tiny_cfg(cache_root, "krea"))
    set_attention_backend(first, "flex")
    second = load_transformer(tiny_cfg(cache_root, "krea"))  # sdpa: trains (flex has no CPU backward)
    out = second(**{**_inputs(), "hidden_states": _inputs()["hidden_states"].requires_grad_()})[0]
    out.sum().backward()


# -- group offload while training ------------------------------------------------------------------
def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2, 16, 8, 8, generator=g),
        "prompt_embeds": torch.randn(2, 32, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
    }


def _sgd_steps(cfg, offload: dict | None, steps: int = 3):
    """Losses and adapter gradients of ``steps`` SGD steps; ``offload`` = group offload settings
    applied after the adapter is injected (None = no offload)."""
    torch.manual_seed(7)
    m = FluxLoRAModule(cfg, AdapterConfig(rank=4, dropout=0.0, init="gaussian"), TimestepConfig())
    m.configure_model()
    if offload is not None:
        apply_group_offload(m.transformer, replace(cfg, enable_group_offload=True, **offload), torch.device("cpu"))
    opt = torch.optim.SGD(m.trainable_parameters(), lr=1.0)
    out = []
    for step in range(steps):
        opt.zero_grad()
        loss = m.training_step(_batch(step), step)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
        opt.step()
    return out


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_group_offload_trains_the_adapter_exactly(tiny_model_cfg, offload_type, checkpointing):
    """Spilled to disk, every offloaded tensor is replaced by uninitialised memory between uses: a
    gradient that reads an offloaded weight, or an adapter weight restored from a stale disk copy,
    shows up as a different loss or gradient."""
    cfg = replace(tiny_model_cfg, gradient_checkpointing=checkpointing)
    reference = _sgd_steps(cfg, None)
    with tempfile.TemporaryDirectory() as spill:
        offloaded = _sgd_steps(cfg, {"group_offload_type": offload_type, "group_offload_to_disk_path": spill})
    for (loss, grads), (ref_loss, ref_grads) in zip(offloaded, reference):
        torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=0, rtol=0, msg=name)


class _Recorder:
    """From the end of ``configure_model`` on: every tensor a ``Module._apply`` (the path of ``.to()``,
    ``.cuda()``, Lightning's ``model_to_device``) touches, and how many offload groups are onloaded
    at once."""

    def __init__(self, monkeypatch):
        from diffusers.hooks.group_offloading import ModuleGroup

        self.moved: list[torch.Tensor] = []
        self.onloaded: set[int] = set()
        self.most_onloaded = self.onloads = 0
        original_apply, onload, offload = torch.nn.Module._apply, ModuleGroup.onload_, ModuleGroup.offload_
        configure_model, armed = FluxLoRAModule.configure_model, []

        def configured(module):
            configure_model(module)
            armed.append(True)

        def _apply(module, fn, recurse=True):
            def recording(t):
                if armed:
                    self.moved.append(t)
                return fn(t)

            return original_apply(module, recording, recurse)

        def onload_(group):
            self.onloaded.add(id(group))
            self.onloads += 1
            self.most_onloaded = max(self.most_onloaded, len(self.onloaded))
            return onload(group)

        def offload_(group):
            self.onloaded.discard(id(group))
            return offload(group)

        monkeypatch.setattr(FluxLoRAModule, "configure_model", configured)
        monkeypatch.setattr(torch.nn.Module, "_apply", _apply)
        monkeypatch.setattr(ModuleGroup, "onload_", onload_)
        monkeypatch.setattr(ModuleGroup, "offload_", offload_)


def test_group_offload_is_in_place_before_lightning_moves_the_model(tiny_model_cfg, cache_root, tmp_path, monkeypatch):
    """A real fit with validation renders: no block weight ever goes through a whole-model move
    (only the offload hooks move it, one block at a time), while the adapter trains on the device."""
    cfg = replace(tiny_model_cfg, enable_group_offload=True)  # CPU "onload device": validate() would refuse
    recorder = _Recorder(monkeypatch)
    validation = ValidationImages(
        str(tmp_path / "val"),
        validation_prompt="a red circle",
        validation_resolution=32,
        validation_num_inference_steps=2,
        every_n_steps=1,
    )
    module, _ = fit_tiny(cfg, cache_root, steps=2, callbacks=[validation], prompts=validation.prompt_texts())
    weights = [
        p for layers in offloadable_layers(module.transformer).values() for _, m in layers for p in m.parameters()
    ]
    moved = {id(t) for t in recorder.moved}
    assert weights and not moved & {id(p) for p in weights}, "a whole-model move reached offloaded block weights"
    assert recorder.most_onloaded == 1 and recorder.onloads > 0  # backward recomputation offloads again
    assert len(list((tmp_path / "val").glob("step_*/*.png"))) == 3  # baseline, step 1, step 2 (final)
    adapter = [p for p in module.parameters() if p.requires_grad]
    assert adapter and {id(p) for p in adapter} <= moved  # the adapter follows the module's moves


# -- attention backends without a backward pass ----------------------------------------------------
class _ForwardOnly(torch.autograd.Function):
    """Attention as a kernel without a backward pass (like SageAttention's)."""

    @staticmethod
    def forward(ctx, query, key, value):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) -> (B, H, S, D)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("Backward pass is not implemented for Sage attention.")


def _fake_sage(query, key, value, attn_mask=None, is_causal=False, scale=None, return_lse=False, _parallel_config=None):
    return _ForwardOnly.apply(query, key, value)


def test_a_forward_only_backend_renders_validation_and_training_keeps_sdpa(
    tiny_model_cfg, cache_root, tmp_path, monkeypatch
):
    """sageattention (simulated: not installed here) has no backward pass: training steps attend
    with sdpa, validation renders with sage, and sdpa is back for the steps after a render."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    import flux_lightning.model.components as components

    monkeypatch.setattr(components, "attention_backend_problem", lambda name: None)  # "installed"
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.SAGE, _fake_sage)
    seen = []

    class Spy(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            attn = pl_module.transformer.transformer_blocks[0].attn
            attn.register_forward_pre_hook(
                lambda m, args: seen.append((torch.is_grad_enabled(), m.processor._attention_backend.value))
            )

    cfg = replace(tiny_model_cfg, attention_backend="sageattention")
    validation = ValidationImages(
        str(tmp_path / "val"),
        validation_prompt="a red circle",
        validation_resolution=32,
        validation_num_inference_steps=2,
        every_n_steps=1,
    )
    fit_tiny(cfg, cache_root, steps=2, callbacks=[Spy(), validation], prompts=validation.prompt_texts())
    training = {backend for grad, backend in seen if grad}
    rendering = {backend for grad, backend in seen if not grad}
    assert training == {"native"} and rendering == {"sage"}
    assert [grad for grad, _ in seen].count(True) >= 2  # both steps ran, after renders


@pytest.mark.parametrize(
    "name,device,trains_with",
    [
        ("sageattention", "cuda", "sdpa"),
        ("flex", "cpu", "sdpa"),
        ("flex", "cuda", "flex"),
        ("flash", "cuda", "flash"),
        ("xformers", "cuda", "xformers"),
        ("sdpa", "cpu", "sdpa"),
    ],
)
def test_training_backend_is_one_with_a_backward_pass(name, device, trains_with):
    from flux_lightning.model.components import training_attention_backend

    assert training_attention_backend(name, device) == trains_with


# -- model CPU offload of the helper models ---------------------------------------------------------
ACCELERATOR = torch.device("cpu", 0)  # stands in for the GPU: CPU tensors, but a move to it is told apart


def _moves(monkeypatch) -> list[tuple[torch.nn.Module, str]]:
    """``(module, target device)`` of every ``Module.to`` call that names a device."""
    moves, original = [], torch.nn.Module.to

    def to(module, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            moves.append((module, str(device)))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return moves


@pytest.mark.parametrize("offload", [True, False])
def test_model_cpu_offload_parks_every_helper_between_validation_rounds(
    tiny_model_cfg, tiny_folder, tmp_path, monkeypatch, offload
):
    """The validation VAE, the preview decoder and the CLIP scorer visit the accelerator for their
    round and go back to the CPU after it; the training transformer is never moved by validation."""
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    from flux_lightning.callbacks import CLIPScoreCallback
    from flux_lightning.model.tiny import build_tiny_autoencoder_tiny, build_tiny_clip

    clip = CLIPScoreCallback(
        str(build_tiny_clip(tmp_path / "clip", tokenizer=CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")))
    )
    validation = ValidationImages(
        str(tmp_path / "val"),
        validation_prompt="a red circle",
        validation_resolution=32,
        validation_num_inference_steps=2,
        validation_preview=True,
        webhook_url="http://127.0.0.1:9/hook",
        webhook_max_attempts=1,
        webhook_backoff=0.0,
        preview_autoencoder=str(build_tiny_autoencoder_tiny(tmp_path / "taef")),
    )
    module = FluxLoRAModule(replace(tiny_model_cfg, enable_model_cpu_offload=offload), AdapterConfig(rank=4))
    module.configure_model()
    module.to(ACCELERATOR)
    clip.load(module.model_cfg)
    g = torch.Generator().manual_seed(1)
    embeddings = {
        t: {"prompt_embeds": torch.randn(16, 32, generator=g), "pooled_prompt_embeds": torch.randn(32, generator=g)}
        for t in validation.prompt_texts()
    }
    trainer = SimpleNamespace(
        global_step=0,
        is_global_zero=True,
        loggers=[],
        callbacks=[clip],
        datamodule=SimpleNamespace(prompt_embedding=lambda t: embeddings[t]),
    )
    moves = _moves(monkeypatch)
    assert len(validation.generate(trainer, module)) == 1 and clip.history

    helpers = {"vae": validation._vae, "preview decoder": validation.preview._autoencoder, "CLIP": clip.metric}
    for name, helper in helpers.items():
        targets = [device for m, device in moves if m is helper]
        assert str(ACCELERATOR) in targets, f"the {name} never went to the accelerator"
        assert targets[-1] == ("cpu" if offload else str(ACCELERATOR)), f"{name}: {targets}"
    assert not [m for m, _ in moves if m is module.transformer or m is module]


def test_the_caching_encoders_are_freed_before_the_transformer_loads(tiny_model_cfg, tmp_path, monkeypatch):
    """Start-up offload needs no switch: Lightning runs ``prepare_data`` (caching) before
    ``configure_model``, and the VAE and text encoders are gone by then."""
    import weakref

    import flux_lightning.data.datamodule as datamodule
    import flux_lightning.training.module as module_file

    encoders, alive_at_load = [], []

    def recorded(load):
        def wrapper(*args, **kwargs):
            out = load(*args, **kwargs)
            encoders.extend(
                weakref.ref(m)
                for m in (out.values() if isinstance(out, dict) else [out])
                if isinstance(m, torch.nn.Module)
            )
            return out

        return wrapper

    original = module_file.load_transformer

    def load_transformer(cfg):  # no gc.collect(): what a reference cycle keeps alive would hold GPU memory
        alive_at_load.extend(ref() for ref in encoders if ref() is not None)
        return original(cfg)

    monkeypatch.setattr(datamodule, "load_vae", recorded(datamodule.load_vae))
    monkeypatch.setattr(datamodule, "load_text_encoders", recorded(datamodule.load_text_encoders))
    monkeypatch.setattr(module_file, "load_transformer", load_transformer)
    fit_tiny(tiny_model_cfg, tmp_path, steps=1)  # a fresh cache: everything is encoded
    assert len(encoders) == 3 and not alive_at_load


def test_group_offload_with_several_devices_is_refused(tiny_model_cfg):
    from types import SimpleNamespace

    module = FluxLoRAModule(replace(tiny_model_cfg, enable_group_offload=True), AdapterConfig(rank=4))
    module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(RuntimeError, match="model.enable_group_offload trains on one device.*trainer.devices=1"):
        module.configure_model()
