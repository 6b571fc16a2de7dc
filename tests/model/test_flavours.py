"""Flavour behaviour on the tiny flavour: guidance modes, attention masking, kontext reference tokens,
schnell's assistant LoRA, and kontext's reference pairs (a reference backend of the one DataModule)."""

from dataclasses import replace

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from safetensors import safe_open

from flux_lightning import DatasetConfig, FluxDataModule, FluxLoRAModule
from flux_lightning.model.flavours import FLAVOURS, tiny_like

from ..support.helpers import REAL_FLAVOURS, batch, fit, lora, predict, timesteps_for, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(cfg, adapter=None, **kw):
    m = FluxLoRAModule(cfg, adapter or lora(init="gaussian"), timesteps_for(cfg), **kw)
    m.configure_model()
    return m


# -- flavour facts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", REAL_FLAVOURS)
def test_tiny_like_copies_behaviour_and_keeps_weights_local(name):
    real, tiny = FLAVOURS[name], tiny_like(FLAVOURS[name])
    for fact in (
        "guidance_embeds",
        "attention_masked",
        "fast_schedule",
        "reference_conditioning",
        "validation_guidance",
        "validation_guidance_real",
        "guidance_value",
    ):
        assert getattr(tiny, fact) == getattr(real, fact), fact
    assert tiny.source == "tiny://" and not tiny.gated and tiny.assistant_lora is None
    assert tiny.t5_max_length == FLAVOURS["tiny"].t5_max_length and tiny.mimics == name


def test_flavour_table_matches_the_quickstart():
    assert {n for n, s in FLAVOURS.items() if not s.guidance_embeds} == {"schnell", "libreflux"}
    assert FLAVOURS["schnell"].t5_max_length == 256 and FLAVOURS["schnell"].fast_schedule
    assert FLAVOURS["schnell"].assistant_lora
    for name in ("fluxbooru", "libreflux"):  # de-distilled: true CFG and >= 28 steps at validation
        assert FLAVOURS[name].validation_guidance_real > 1 and FLAVOURS[name].validation_steps >= 28
    assert FLAVOURS["libreflux"].attention_masked
    assert [n for n, s in FLAVOURS.items() if s.reference_conditioning] == ["kontext"]


def test_tiny_like_builds_a_transformer_with_or_without_guidance_embedding(cache_root):
    assert _module(tiny_cfg(cache_root, "schnell")).transformer.config.guidance_embeds is False
    assert _module(tiny_cfg(cache_root, "krea")).transformer.config.guidance_embeds is True


# -- guidance ---------------------------------------------------------------------------------------
def _guidance_seen(module, data):
    seen = []
    hook = module.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True
    )
    module.training_step(data, 0)
    hook.remove()
    return seen[0]


def test_guidance_constant_random_range_and_absent(cache_root):
    data = batch(b=64)
    constant = _module(tiny_cfg(cache_root, "dev", guidance_value=3.5))
    torch.testing.assert_close(_guidance_seen(constant, data), torch.full((64,), 3.5))
    ranged = _module(
        tiny_cfg(cache_root, "dev", flux_guidance_mode="random-range", flux_guidance_min=2.0, flux_guidance_max=5.0)
    )
    g = _guidance_seen(ranged, data)
    assert g.min() >= 2.0 and g.max() <= 5.0 and g.std() > 0.5  # per-sample draws
    assert _guidance_seen(_module(tiny_cfg(cache_root, "schnell")), data) is None


# -- attention-masked training (libreflux) -----------------------------------------------------------
def test_padding_tokens_cannot_change_the_image_prediction_when_masked(cache_root):
    module = _module(tiny_cfg(cache_root, "libreflux"))
    data = batch(pad_from=6)
    other = dict(data, prompt_embeds=data["prompt_embeds"].clone())
    other["prompt_embeds"][:, 6:] = torch.randn_like(other["prompt_embeds"][:, 6:]) * 5  # new padding
    module.transformer.eval()

    def run(d, masked):
        mask = {"attention_mask": d["attention_mask"]} if masked else {}
        return module(d["latents"], torch.tensor([0.3, 0.8]), d["prompt_embeds"], d["pooled_prompt_embeds"], **mask)

    with torch.no_grad():
        torch.testing.assert_close(run(data, True), run(other, True), atol=1e-6, rtol=1e-6)
        assert (run(data, False) - run(other, False)).abs().max() > 1e-3, "padding matters without the mask"


def test_mask_is_the_t5_mask_extended_with_ones_for_image_tokens(cache_root):
    module = _module(tiny_cfg(cache_root, "libreflux"))
    masks = []
    hook = module.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs["joint_attention_kwargs"]["attention_mask"]), with_kwargs=True
    )
    predict(module)
    hook.remove()
    expected = torch.cat([batch(7)["attention_mask"].bool(), torch.ones(2, 16, dtype=torch.bool)], dim=1)
    assert torch.equal(masks[0], expected)


# -- kontext reference conditioning ------------------------------------------------------------------
def test_kontext_reference_tokens_follow_diffusers_kontext_layout(cache_root):
    module = _module(tiny_cfg(cache_root, "kontext"))
    module.transformer.eval()
    data = batch()
    sigmas = torch.tensor([0.3, 0.8])
    ours = module(
        data["latents"],
        sigmas,
        data["prompt_embeds"],
        data["pooled_prompt_embeds"],
        reference_latents=data["reference_latents"],
    )
    # FluxKontextPipeline: image ids channel 0 = 1 for the reference, tokens appended, prediction cut
    latents = FluxKontextPipeline._pack_latents(data["latents"], 2, 16, 8, 8)
    ref = FluxKontextPipeline._pack_latents(data["reference_latents"], 2, 16, 8, 8)
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    ref_ids = FluxKontextPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    ref_ids[..., 0] = 1
    with torch.no_grad():
        pred = module.transformer(
            hidden_states=torch.cat([latents, ref], dim=1),
            timestep=sigmas,
            guidance=torch.ones(2),
            pooled_projections=data["pooled_prompt_embeds"],
            encoder_hidden_states=data["prompt_embeds"],
            txt_ids=torch.zeros(32, 3),
            img_ids=torch.cat([latent_ids, ref_ids], dim=0),
            return_dict=False,
        )[0][:, : latents.shape[1]]
    expected = FluxPipeline._unpack_latents(pred, 64, 64, 8)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    other = module(
        data["latents"],
        sigmas,
        data["prompt_embeds"],
        data["pooled_prompt_embeds"],
        reference_latents=torch.zeros_like(data["reference_latents"]),
    )
    assert (other - ours).abs().max() > 1e-3, "the reference does not reach the prediction"


def test_kontext_without_pairs_says_what_is_missing(cache_root):
    module = _module(tiny_cfg(cache_root, "kontext"))
    data = {k: v for k, v in batch().items() if k != "reference_latents"}
    with pytest.raises(KeyError, match="reference_latents"):
        module.training_step(data, 0)


def test_demo_pairs_serve_reference_latents(cache_root, tmp_path):
    cfg = tiny_cfg(cache_root, "kontext")
    dm = FluxDataModule(
        DatasetConfig(
            resolution=64, batch_size=2, cache_dir=str(cache_root), demo_images=4, caption_dropout_probability=0.0
        ),
        cfg,
    )
    dm.prepare_data()
    dm.setup()
    item = dm.train_dataset[(0, 0)]
    assert item["reference_latents"].shape == item["latents"].shape == (16, 8, 8)
    assert not torch.equal(item["reference_latents"], item["latents"])
    sample = dm.train_dataset.samples[0]
    ref_path = sample.reference.path
    assert ref_path.name == sample.path.name and ref_path.parent.name == f"{sample.path.parent.name}-reference-gray"
    loaded = next(iter(dm.train_dataloader()))
    assert loaded["reference_latents"].shape == (2, 16, 8, 8)


def test_images_without_a_reference_are_skipped(cache_root, tmp_path):
    from PIL import Image

    images, refs = tmp_path / "images", tmp_path / "refs"
    images.mkdir(), refs.mkdir()
    for name in ("a red circle", "a blue square", "a green triangle"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(images / f"{name}.png")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(refs / "a red circle.jpg")  # another extension is fine
    Image.new("RGB", (64, 64), (90, 90, 90)).save(refs / "a blue square.png")
    dm = FluxDataModule(
        DatasetConfig(
            instance_data_dir=str(images),
            conditioning_data_dir=str(refs),
            resolution=64,
            batch_size=1,
            cache_dir=str(tmp_path / "cache"),
        ),
        tiny_cfg(cache_root, "kontext"),
    )
    assert len(dm.samples()) == 2 and dm.skipped == 1


# -- schnell's assistant LoRA ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assistant_file(cache_root, tmp_path_factory):
    """A LoRA for the unguided tiny transformer, exported in diffusers keys (stands in for ostris'
    schnell training adapter)."""
    module = fit(tiny_cfg(cache_root, "schnell"), lora(rank=2, target="mmdit", init="gaussian"), steps=1)
    return module.export_adapter(tmp_path_factory.mktemp("assistant"), dtype=torch.float32)


def test_assistant_lora_is_frozen_stacked_and_never_saved(cache_root, assistant_file, tmp_path):
    cfg = tiny_cfg(cache_root, "schnell", assistant_lora_path=str(assistant_file))
    module = fit(cfg, lora(init="gaussian"), steps=2)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assistant = {n for n, _ in module.named_parameters() if ".assistant." in n}
    assert assistant and not names & assistant and all(".default." in n for n in names)
    assert set(module.state_dict()) == names  # the checkpoint holds the trained adapter only
    with safe_open(module.export_adapter(tmp_path), "pt") as f:
        assert not any("assistant" in k for k in f.keys())

    without = _module(replace(cfg, assistant_lora_path="none"), lora(init="gaussian"))
    without.load_state_dict(module.state_dict())
    stacked, alone = predict(module), predict(without)
    assert (stacked - alone).abs().max() > 1e-3, "the assistant has no effect"
    with module.inference_adapters():  # validation renders without the assistant
        torch.testing.assert_close(predict(module), alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(predict(module), stacked)  # and it is back afterwards
    assert not any(p.requires_grad for n, p in module.named_parameters() if ".assistant." in n)


def test_inference_adapters_passes_the_mask_to_any_pipeline_call(cache_root):
    module = _module(tiny_cfg(cache_root, "libreflux"))
    mask = torch.zeros(32, dtype=torch.uint8)
    mask[:3] = 1
    seen = []
    with module.inference_adapters(text_attention_mask=mask):
        hook = module.transformer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["joint_attention_kwargs"]["attention_mask"]), with_kwargs=True
        )
        predict_with_plain_call = module.transformer(
            hidden_states=torch.randn(1, 16, 64),
            timestep=torch.tensor([0.5]),
            pooled_projections=torch.randn(1, 32),
            encoder_hidden_states=torch.randn(1, 32, 32),
            txt_ids=torch.zeros(32, 3),
            img_ids=torch.zeros(16, 3),
        )
        hook.remove()
    assert predict_with_plain_call is not None
    assert seen[0].shape == (1, 48) and seen[0][0, :3].all() and not seen[0][0, 3:32].any() and seen[0][0, 32:].all()
