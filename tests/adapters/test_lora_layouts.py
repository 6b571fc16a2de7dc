"""diffusers, ComfyUI and kohya files of one LoRA (alpha != rank) load to the same model in diffusers'
own loader and in ComfyUI's (emulated in tests/support/comfy_loader.py)."""

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from flux_lightning import AdapterConfig
from flux_lightning.adapters import ADAPTER_FILENAME
from flux_lightning.adapters.lora_layouts import (
    FLUX_LINEARS,
    FLUX_MODULES,
    LoraModule,
    convert,
    file_layout,
    fused_parts,
    kohya_name,
    read_modules,
    tensors_for,
    unknown_modules,
)
from flux_lightning.errors import LoraFileError
from flux_lightning.model.forecast import FLUX1_TRANSFORMER

from ..conftest import fit_tiny
from ..support.comfy_loader import comfyui_apply, effective_weights
from .test_adapters import _predict

# every double-block module kohya fuses or renames, plus single-block linear2 and modulation.
# (diffusers' kohya reader hard-codes FLUX.1's 3072/12288 widths when splitting single-block
# linear1, so the tiny model's linear1 is checked by the math test below instead.)
TARGETS = [
    f"transformer_blocks.{i}.{m}"
    for i in (0, 1)
    for m in (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.2",
    )
] + ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]


@pytest.fixture(scope="module")
def trained(tiny_model_cfg, cache_root):
    module, _ = fit_tiny(
        tiny_model_cfg,
        cache_root,
        steps=5,
        lr=2e-2,
        adapter=AdapterConfig(rank=4, alpha=8.0, dropout=0.0, target=TARGETS),
    )
    return module


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_each_format_loads_in_diffusers_and_reproduces_the_model(trained, tiny_folder, tmp_path, fmt):
    trained.export_adapter(tmp_path, dtype=torch.float32, lora_format=fmt)
    keys = list(safe_open(tmp_path / ADAPTER_FILENAME, "pt").keys())
    if fmt == "kohya":
        assert all(k.startswith("lora_unet_") for k in keys)
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    else:
        assert all(k.startswith("transformer.") for k in keys)
        assert any(k.endswith(".alpha") for k in keys) == (fmt == "comfyui")
    pipe = FluxPipeline.from_pretrained(tiny_folder)
    base = _predict(pipe.transformer)
    pipe.load_lora_weights(tmp_path)
    ours = _predict(trained.transformer)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(_predict(pipe.transformer), ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_comfyui_loader_applies_each_format_at_the_trained_strength(trained, tmp_path, fmt):
    """ComfyUI reads tensors only (alpha from ``.alpha`` tensors, else scale 1): every format must
    still give W + (alpha / r) B A, here with alpha = 2 r."""
    path = trained.export_adapter(tmp_path, dtype=torch.float32, lora_format=fmt)
    patched, not_loaded = comfyui_apply(load_file(path), trained.transformer)
    assert not not_loaded, f"ComfyUI would not load {sorted(not_loaded)[:3]}"
    expected = effective_weights(trained.transformer)
    assert patched.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(patched[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_alpha_keeps_its_effect_without_metadata(trained, tiny_folder, tmp_path):
    """A loader that ignores file metadata applies every format at the trained strength."""
    for fmt in ("diffusers", "comfyui", "kohya"):
        trained.export_adapter(tmp_path / fmt, dtype=torch.float32, lora_format=fmt)
        state = load_file(tmp_path / fmt / ADAPTER_FILENAME)  # tensors only, metadata dropped
        pipe = FluxPipeline.from_pretrained(tiny_folder)
        pipe.load_lora_weights(state)
        torch.testing.assert_close(_predict(pipe.transformer), _predict(trained.transformer), atol=1e-5, rtol=1e-4)


def test_kohya_fusion_is_the_same_update_including_single_block_linear1():
    g = torch.Generator().manual_seed(0)
    r, d_in, inner, mlp = 2, 6, 8, 12
    state = {}
    for m, out in [("attn.to_q", inner), ("attn.to_k", inner), ("attn.to_v", inner)]:
        state[f"single_transformer_blocks.3.{m}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
        state[f"single_transformer_blocks.3.{m}.lora_B.weight"] = torch.randn(out, r, generator=g)
    widths = {f"single_transformer_blocks.3.{m}": inner for m in ("attn.to_q", "attn.to_k", "attn.to_v")}
    widths["single_transformer_blocks.3.proj_mlp"] = mlp
    out = convert(state, "kohya", alpha=3.0, out_features=widths)
    down = out["lora_unet_single_blocks_3_linear1.lora_down.weight"]
    up = out["lora_unet_single_blocks_3_linear1.lora_up.weight"]
    alpha = out["lora_unet_single_blocks_3_linear1.alpha"].item()
    fused = alpha / down.shape[0] * up @ down
    expected = torch.cat(
        [
            3.0
            / r
            * state[f"single_transformer_blocks.3.{m}.lora_B.weight"]
            @ state[f"single_transformer_blocks.3.{m}.lora_A.weight"]
            for m in ("attn.to_q", "attn.to_k", "attn.to_v")
        ]
        + [torch.zeros(mlp, d_in)]
    )
    torch.testing.assert_close(fused, expected)
    assert up.shape == (3 * inner + mlp, 3 * r)


def test_unknown_module_or_format_is_refused():
    with pytest.raises(ValueError, match="no name for module 'x_embedder'"):
        kohya_name("x_embedder")
    with pytest.raises(ValueError, match="lora_format='a1111' is unknown"):
        convert({}, "a1111", alpha=1.0)


# -- the one table: every Flux Linear module, the same names read and written -----------------------
def _diffusers_flux_linears() -> set[str]:
    """Every Linear module name of diffusers' Flux transformer with one block of each kind (built on
    the meta device: nothing is allocated)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**FLUX1_TRANSFORMER, "num_layers": 1, "num_single_layers": 1})
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_the_table_covers_every_flux_linear_module_once():
    assert set(FLUX_LINEARS) == _diffusers_flux_linears()
    assert len(FLUX_LINEARS) == len(set(FLUX_LINEARS))
    for row in FLUX_MODULES:  # a fused module's parts are 0..parts-1, each once, read back where written
        parts = fused_parts(row.kohya.format(7))
        assert [p.part for p in parts] == list(range(row.parts)), row
        assert row.diffusers.format(7) in [p.diffusers for p in parts]
        if row.written:
            assert kohya_name(row.diffusers.format(7)) == (row.kohya.format(7), row.part, row.parts)
    assert unknown_modules(["transformer_blocks.12.attn.to_q", "norm_out.linear", "pos_embed"]) == ["pos_embed"]


def _lora(modules, rank=2, alpha=3.0, seed=0, d_in=8, inner=8):
    g = torch.Generator().manual_seed(seed)
    widths = {m: 4 * inner if m.endswith("proj_mlp") else inner for m in modules}
    return {
        m: LoraModule(torch.randn(rank, d_in, generator=g), torch.randn(widths[m], rank, generator=g), alpha)
        for m in modules
    }


def _same_deltas(read, expected):
    assert read.keys() == expected.keys()
    for m in expected:
        torch.testing.assert_close(read[m].delta(), expected[m].delta(), atol=1e-5, rtol=1e-5, msg=m)


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "kohya"])
def test_reading_what_each_layout_writes_gives_back_the_same_modules(layout):
    written = [
        r.diffusers.format(i) for r in FLUX_MODULES if r.written for i in (("0", "3") if "{}" in r.diffusers else ("",))
    ]
    lora = _lora(written)
    lora["single_transformer_blocks.3.attn.to_k"] = _lora(["x"], rank=3, alpha=1.5, seed=1)["x"]  # another rank
    del lora["transformer_blocks.0.attn.add_k_proj"]  # a fused module with a part missing
    tensors = tensors_for(lora, layout)
    assert file_layout("f", tensors) == layout
    read = read_modules("f", tensors, {}, layout)
    _same_deltas(read, lora)
    assert {m: mod.rank for m, mod in read.items()} == {m: mod.rank for m, mod in lora.items()}


def test_kohya_names_read_as_diffusers_own_converter_reads_them_including_sd_scripts_only_modules():
    """Every table row but single-block linear1 (diffusers splits it at FLUX.1's widths) against
    ``_convert_kohya_flux_lora_to_diffusers``; the embedders and norm_out are written by sd-scripts
    only (norm_out's rows are BFL's shift, scale: swapped). alpha = r: diffusers drops the final layer's."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    lora = _lora([r.diffusers.format(0) for r in FLUX_MODULES if r.parts != 4], alpha=2.0)
    tensors = tensors_for(
        {r.diffusers.format(0): lora[r.diffusers.format(0)] for r in FLUX_MODULES if r.written and r.parts != 4},
        "kohya",
    )
    for row in FLUX_MODULES:
        if not row.written:
            mod = lora[row.diffusers]
            up = torch.cat(mod.up.chunk(2)[::-1]) if row.diffusers == "norm_out.linear" else mod.up
            key = f"lora_unet_{row.kohya}"
            tensors.update({f"{key}.lora_down.weight": mod.down, f"{key}.lora_up.weight": up})
    ours = read_modules("f", tensors, {}, file_layout("f", tensors))
    _same_deltas(ours, lora)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    theirs = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): k
        for k in converted
        if k.endswith(".lora_A.weight")
    }
    assert theirs.keys() == ours.keys()
    for m, key in theirs.items():
        delta = converted[key.replace(".lora_A.", ".lora_B.")] @ converted[key]
        torch.testing.assert_close(delta, ours[m].delta(), atol=1e-5, rtol=1e-5, msg=m)


def test_a_kohya_module_the_table_does_not_know_or_cannot_split_names_the_key():
    down, up = torch.ones(2, 8), torch.ones(10, 2)
    for name, words in (
        ("lora_unet_double_blocks_0_img_attn_rope", "names no module"),
        ("lora_unet_single_blocks_0_linear1", "10 rows, not 7 x"),
    ):
        tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        with pytest.raises(LoraFileError, match=f"f: {name} .*{words}"):
            read_modules("f", tensors, {}, "kohya")


def test_a_kohya_file_read_and_written_again_is_the_same_file():
    """Reading keeps the file's alpha (no folding into the factors), so kohya -> kohya is exact."""
    written = [r.diffusers.format(0) for r in FLUX_MODULES if r.written]
    tensors = tensors_for(_lora(written, rank=2, alpha=5.0), "kohya")
    again = tensors_for(read_modules("f", tensors, {}, "kohya"), "kohya")
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
