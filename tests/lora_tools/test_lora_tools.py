"""``python -m flux_lightning.lora_tools``: merge, resize and convert, checked against diffusers' own loader,
torch.linalg.svd and the ComfyUI loader stand-in (tests/support/comfy_loader.py), on the tiny model."""

from __future__ import annotations

import runpy
import subprocess
import sys
from functools import partial

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from flux_lightning.adapters.lora_files import read_lora, write_lora
from flux_lightning.adapters.lora_layouts import LoraModule, convert
from flux_lightning.errors import LoraFileError, ModelSourceError
from flux_lightning.lora_tools.cli import main
from flux_lightning.lora_tools.convert import convert_file
from flux_lightning.lora_tools.resize import low_rank_svd, overall_energy, resize_file

from ..adapters.test_adapters import _predict
from ..support.comfy_loader import comfyui_apply
from ..support.hostile import exits_2, process_exits_2

pytestmark = pytest.mark.usefixtures("one_thread")

# double-block q/k/v (fused qkv in kohya), their context twins, projections, single-block linear1
# parts (q, k, v without the MLP: fused with zero rows) and linear2
MODULES = [
    f"transformer_blocks.{i}.attn.{m}"
    for i in (0, 1)
    for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_v_proj", "to_out.0")
] + [
    "transformer_blocks.0.ff.net.2",
    "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.attn.to_v",
    "single_transformer_blocks.1.proj_mlp",
    "single_transformer_blocks.1.proj_out",
    "proj_out",
]  # kohya's final_layer_linear: the final layer (proj_out) keeps its alpha


@pytest.fixture(scope="module")
def linears(tiny_folder):
    model = FluxTransformer2DModel.from_pretrained(tiny_folder, subfolder="transformer")
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    """One tiny pipeline for the module; each test unloads the LoRAs it loads."""
    return FluxPipeline.from_pretrained(tiny_folder)


def random_lora(linears, rank=4, alpha=8.0, seed=0, modules=MODULES) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        d_in, d_out = linears[m]
        out[m] = LoraModule(
            torch.randn(rank, d_in, generator=g) * 0.3, torch.randn(d_out, rank, generator=g) * 0.3, alpha
        )
    return out


def deltas(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    return {m: mod.delta() for m, mod in modules.items()}


def assert_same_deltas(a, b):
    assert a.keys() == b.keys()
    for m in a:
        torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5, msg=m)


def _ours(linears, tmp_path, fmt, **kw):
    """A file our training exporter would write (lora_layouts.convert over PEFT-named tensors)."""
    lora = random_lora(linears, **kw)
    state = {}
    for m, mod in lora.items():
        if fmt == "diffusers":  # export.export_lora folds alpha / r into B for this layout
            mod = mod.folded()
        state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"] = mod.down, mod.up
    widths = {m: o for m, (_, o) in linears.items()}
    path = tmp_path / f"{fmt}.safetensors"
    save_file(convert(state, fmt, alpha=kw.get("alpha", 8.0), out_features=widths), path)
    return lora, path


# -- convert ---------------------------------------------------------------------------------------
def test_round_trips_between_our_three_layouts_keep_every_delta(linears, tmp_path):
    lora, path = _ours(linears, tmp_path, "comfyui")
    expected = deltas(lora)
    assert_same_deltas(deltas(read_lora(path).modules), expected)
    for first in ("diffusers", "kohya", "comfyui"):
        for second in ("diffusers", "comfyui", "kohya"):
            a, b = tmp_path / f"{first}.a.safetensors", tmp_path / f"{first}-{second}.safetensors"
            convert_file(path, first, a, overwrite=True)
            convert_file(a, second, b)
            read = read_lora(b)
            assert read.layout == second
            assert_same_deltas(deltas(read.modules), expected)
    # split back from kohya's fused qkv / linear1, each part has its own rank again
    assert {mod.rank for mod in read_lora(tmp_path / "kohya-diffusers.safetensors").modules.values()} == {4}


@pytest.mark.parametrize("to", ["comfyui", "kohya"])
def test_converted_files_apply_in_comfyui_as_the_update(linears, tiny_folder, tmp_path, to):
    lora, path = _ours(linears, tmp_path, "diffusers")
    out = tmp_path / f"out-{to}.safetensors"
    assert main(["convert", "--lora", str(path), "--to", to, "--out", str(out)]) == 0
    model = FluxTransformer2DModel.from_pretrained(tiny_folder, subfolder="transformer")
    patched, not_loaded = comfyui_apply(load_file(out), model)
    assert not not_loaded
    weights = dict(model.named_modules())
    for m, delta in deltas(lora).items():
        torch.testing.assert_close(patched[m], weights[m].weight.detach() + delta, atol=1e-5, rtol=1e-5, msg=m)


def _sd_scripts_file(lora: dict[str, LoraModule], linears, path):
    """Hand-built like sd-scripts' networks/lora_flux.py saves: BFL module names, one down for the
    fused qkv (each part's rank rows stacked), block-diagonal up, one alpha per fused module."""
    tensors = {}

    def put(name, down, up, alpha):
        tensors[f"lora_unet_{name}.lora_down.weight"] = down
        tensors[f"lora_unet_{name}.lora_up.weight"] = up
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)

    r = 4
    for i in (0, 1):
        parts = [lora[f"transformer_blocks.{i}.attn.{p}"] for p in ("to_q", "to_k", "to_v")]
        down = torch.cat([p.down for p in parts])
        up = torch.block_diag(*[p.up for p in parts])
        put(f"double_blocks_{i}_img_attn_qkv", down, up, parts[0].alpha * 3)  # alpha / (3 r) == alpha_part / r
        put(
            f"double_blocks_{i}_img_attn_proj",
            lora[f"transformer_blocks.{i}.attn.to_out.0"].down,
            lora[f"transformer_blocks.{i}.attn.to_out.0"].up,
            parts[0].alpha,
        )
    # txt qkv with q and v trained, k absent: zero up rows for k
    for i in (0, 1):
        q, v = lora[f"transformer_blocks.{i}.attn.add_q_proj"], lora[f"transformer_blocks.{i}.attn.add_v_proj"]
        width = q.up.shape[0]
        up = torch.zeros(3 * width, 2 * r)
        up[:width, :r], up[2 * width :, r:] = q.up, v.up
        put(f"double_blocks_{i}_txt_attn_qkv", torch.cat([q.down, v.down]), up, q.alpha * 2)
    inner = linears["single_transformer_blocks.0.attn.to_q"][1]
    parts = [lora[f"single_transformer_blocks.0.attn.{p}"] for p in ("to_q", "to_k", "to_v")]
    up = torch.zeros(7 * inner, 3 * r)
    for j, p in enumerate(parts):
        up[j * inner : (j + 1) * inner, j * r : (j + 1) * r] = p.up
    put("single_blocks_0_linear1", torch.cat([p.down for p in parts]), up, parts[0].alpha * 3)
    mlp = lora["single_transformer_blocks.1.proj_mlp"]
    up = torch.zeros(7 * inner, r)
    up[3 * inner :] = mlp.up
    put("single_blocks_1_linear1", mlp.down, up, mlp.alpha)
    mod = lora["single_transformer_blocks.1.proj_out"]
    put("single_blocks_1_linear2", mod.down, mod.up, mod.alpha)
    mod = lora["transformer_blocks.0.ff.net.2"]
    put("double_blocks_0_img_mlp_2", mod.down, mod.up, mod.alpha)
    put("final_layer_linear", lora["proj_out"].down, lora["proj_out"].up, lora["proj_out"].alpha)
    save_file(tensors, path)


def test_an_sd_scripts_kohya_file_converts_to_diffusers_and_loads_with_the_same_output(linears, pipe, tmp_path):
    lora = random_lora(linears, rank=4, alpha=2.0, seed=1)
    _sd_scripts_file(lora, linears, tmp_path / "sd_scripts.safetensors")
    reference = tmp_path / "reference.safetensors"
    write_lora(lora, "diffusers", reference)
    out = tmp_path / "converted.safetensors"
    convert_file(tmp_path / "sd_scripts.safetensors", "diffusers", out)
    assert_same_deltas(deltas(read_lora(out).modules), deltas(lora))
    base = _predict(pipe.transformer)
    try:
        pipe.load_lora_weights(str(reference), adapter_name="reference")
        expected = _predict(pipe.transformer)
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(out), adapter_name="converted")
        assert (expected - base).abs().max() > 1e-3
        torch.testing.assert_close(_predict(pipe.transformer), expected, atol=1e-5, rtol=1e-4)
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("prefix", ["transformer.", "diffusion_model."])
def test_an_ai_toolkit_file_loads(linears, tmp_path, prefix):
    """ai-toolkit writes PEFT keys over diffusers names (alpha folded, no alpha tensors), at times
    with a ``diffusion_model.`` prefix; BFL names under ``diffusion_model.`` are ComfyUI's kohya twin."""
    lora = random_lora(linears, rank=2, alpha=2.0, seed=2)
    tensors = {}
    for m, mod in lora.items():
        tensors[f"{prefix}{m}.lora_A.weight"], tensors[f"{prefix}{m}.lora_B.weight"] = mod.down, mod.up
    save_file(tensors, tmp_path / "ait.safetensors")
    read = read_lora(tmp_path / "ait.safetensors")
    assert read.layout == "diffusers"
    assert_same_deltas(deltas(read.modules), deltas(lora))
    bfl = {
        "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": lora["transformer_blocks.0.attn.to_out.0"].down,
        "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": lora["transformer_blocks.0.attn.to_out.0"].up,
    }
    save_file(bfl, tmp_path / "bfl.safetensors")
    read = read_lora(tmp_path / "bfl.safetensors")
    assert read.layout == "kohya"
    torch.testing.assert_close(
        read.modules["transformer_blocks.0.attn.to_out.0"].delta(), lora["transformer_blocks.0.attn.to_out.0"].delta()
    )


def test_an_untrained_fused_module_is_kept_and_a_partly_trained_one_keeps_its_parts(linears, tmp_path):
    lora = random_lora(linears, rank=2, modules=["transformer_blocks.0.attn.to_q"])
    width = lora["transformer_blocks.0.attn.to_q"].up.shape[0]
    up = torch.zeros(3 * width, 2)
    zero = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 32),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
    }
    save_file(zero, tmp_path / "zero.safetensors")
    assert sorted(read_lora(tmp_path / "zero.safetensors").modules) == [
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",
    ]
    up[:width] = lora["transformer_blocks.0.attn.to_q"].up
    save_file({**zero, "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up}, tmp_path / "q.safetensors")
    assert list(read_lora(tmp_path / "q.safetensors").modules) == ["transformer_blocks.0.attn.to_q"]


# -- resize ----------------------------------------------------------------------------------------
def test_resize_reproduces_a_lora_of_lower_true_rank_and_keeps_the_layout(linears, tmp_path):
    lora = random_lora(linears, rank=8, alpha=4.0, seed=3)
    for m, mod in lora.items():  # true rank 3 inside rank-8 factors
        mod.down = torch.randn(8, 3, generator=torch.Generator().manual_seed(7)) @ mod.down[:3]
    # kohya resizes its own (fused) modules, as sd-scripts does: a fused q, k, v has true rank 9
    for fmt, rank in (("diffusers", 4), ("comfyui", 3), ("kohya", 9)):
        path, out = tmp_path / f"{fmt}.safetensors", tmp_path / f"{fmt}-resized.safetensors"
        write_lora(lora, fmt, path)
        report = resize_file(path, rank, out)
        assert overall_energy(report) == pytest.approx(1.0, abs=1e-9)
        before, after = load_file(path), load_file(out)
        assert after.keys() == before.keys()
        downs = [k for k in before if k.endswith((".lora_A.weight", ".lora_down.weight"))]
        assert any(before[k].shape[0] > rank for k in downs)
        assert all(after[k].shape[0] == min(rank, before[k].shape[0]) for k in downs)
        read = read_lora(out)
        assert read.layout == fmt
        assert_same_deltas(deltas(read.modules), deltas(lora))


def test_resize_is_the_best_rank_r_approximation_and_prints_its_energy(linears, tmp_path, capsys):
    lora = random_lora(linears, rank=6, alpha=3.0, seed=4)
    path = tmp_path / "in.safetensors"
    write_lora(lora, "comfyui", path)
    assert main(["resize", "--lora", str(path), "--rank", "2", "--out", str(tmp_path / "r2.safetensors")]) == 0
    printed = capsys.readouterr().out
    read = read_lora(tmp_path / "r2.safetensors").modules
    kept = total = 0.0
    for m, mod in lora.items():
        u, s, vh = torch.linalg.svd(mod.delta().double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(read[m].delta().double(), best, atol=1e-5, rtol=1e-5)
        energy = (s[:2].square().sum() / s.square().sum()).item()
        assert f"{m} " in printed and f"energy {energy:.6f}" in printed
        kept, total = kept + s[:2].square().sum().item(), total + s.square().sum().item()
    assert f"overall retained energy {kept / total:.6f}" in printed
    assert kept / total < 0.99
    u, s, vh = low_rank_svd(lora[MODULES[0]].down, lora[MODULES[0]].up, 0.5)
    torch.testing.assert_close(s, torch.linalg.svdvals(lora[MODULES[0]].delta().double())[:6])


# -- merge -----------------------------------------------------------------------------------------
def test_merge_equals_the_pipeline_with_the_lora_loaded(linears, pipe, tiny_folder, tmp_path):
    """ComfyUI layout (alpha 6 != rank 4, as .alpha tensors) at strength 0.5."""
    lora, path = _ours(linears, tmp_path, "comfyui", alpha=6.0)
    args = ["merge", "--base", str(tiny_folder), "--lora", str(path), "--out", str(tmp_path / "merged")]
    assert main(args + ["--scale", "0.5"]) == 0
    base = _predict(pipe.transformer)
    try:
        pipe.load_lora_weights(str(path), adapter_name="x")
        pipe.set_adapters(["x"], [0.5])
        expected = _predict(pipe.transformer)
    finally:
        pipe.unload_lora_weights()
    merged = FluxPipeline.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.transformer.named_parameters())
    # PEFT also wraps single_transformer_blocks.0.proj_out (it matches the target "proj_out" by suffix):
    # a layer outside the LoRA keeps the base's weight
    torch.testing.assert_close(
        merged.transformer.single_transformer_blocks[0].proj_out.weight,
        pipe.transformer.single_transformer_blocks[0].proj_out.weight,
        atol=0,
        rtol=0,
    )
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(_predict(merged.transformer), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_predict(pipe.transformer), base)  # the shared pipeline is clean again


# -- errors ----------------------------------------------------------------------------------------
def test_user_errors_name_the_file_and_exit_2(linears, tiny_folder, tmp_path, capsys):
    def fails(args, *words):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        for w in words:
            assert w in err, err

    missing = str(tmp_path / "missing.safetensors")
    argv = ["flux_lightning.lora_tools", "convert", "--lora", missing, "--to", "kohya", "--out", "o.safetensors"]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_:  # the module as `python -m` runs it
        mp.setattr(sys, "argv", argv)
        runpy.run_module("flux_lightning.lora_tools", run_name="__main__")
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {missing}: no such LoRA file; pass the path of a .safetensors file"
    )
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(2, 2)}, tmp_path / "lokr.safetensors")
    save_file({"model.layers.0.weight": torch.ones(2, 2)}, tmp_path / "full.safetensors")
    fails(
        [
            "convert",
            "--lora",
            str(tmp_path / "lokr.safetensors"),
            "--to",
            "kohya",
            "--out",
            str(tmp_path / "o.safetensors"),
        ],
        "lokr.safetensors",
        "unknown LoRA format",
        "LyCORIS",
    )
    fails(
        [
            "resize",
            "--lora",
            str(tmp_path / "full.safetensors"),
            "--rank",
            "2",
            "--out",
            str(tmp_path / "o.safetensors"),
        ],
        "full.safetensors",
        "unknown LoRA format",
    )
    other = {
        "text_model.layers.0.q.lora_A.weight": torch.ones(2, 8),
        "text_model.layers.0.q.lora_B.weight": torch.ones(8, 2),
    }
    save_file(other, tmp_path / "other.safetensors")
    fails(
        [
            "convert",
            "--lora",
            str(tmp_path / "other.safetensors"),
            "--to",
            "comfyui",
            "--out",
            str(tmp_path / "o.safetensors"),
        ],
        "other.safetensors",
        "no layer of a Flux transformer",
    )
    wide = random_lora({"transformer_blocks.0.attn.to_q": (64, 64)}, modules=["transformer_blocks.0.attn.to_q"])
    write_lora(wide, "diffusers", tmp_path / "wide.safetensors")
    fails(
        [
            "merge",
            "--base",
            str(tiny_folder),
            "--lora",
            str(tmp_path / "wide.safetensors"),
            "--out",
            str(tmp_path / "m"),
        ],
        "wide.safetensors",
        "trained for",
    )
    fails(
        ["merge", "--base", str(tmp_path), "--lora", str(tmp_path / "wide.safetensors"), "--out", str(tmp_path / "m")],
        str(tmp_path),
        "not a local diffusers folder",
    )
    with pytest.raises(LoraFileError, match="kohya layout has no key for module 'x_embedder'"):
        write_lora(random_lora({"x_embedder": (4, 8)}, modules=["x_embedder"]), "kohya", tmp_path / "k.safetensors")
    assert issubclass(ModelSourceError, Exception)


# -- hostile inputs: exit 2, one line naming the file and key, nothing written (issue 23) ----------
Q = "transformer.transformer_blocks.0.attn.to_q"
KOHYA = "lora_unet_double_blocks_0_img_attn_proj"
_A, _B = torch.full((4, 32), 0.1), torch.full((32, 4), 0.1)


def _pair(prefix=Q, down=_A, up=_B, **extra):
    suffixes = (
        (".lora_down.weight", ".lora_up.weight")
        if prefix.startswith("lora_unet_")
        else (".lora_A.weight", ".lora_B.weight")
    )
    return {prefix + suffixes[0]: down, prefix + suffixes[1]: up, **{f"{prefix}.{k}": v for k, v in extra.items()}}


def _meta(**config):
    import json

    return {"lora_adapter_metadata": json.dumps(config)}


NAN, INF = float("nan"), float("inf")
# (id, tensors, metadata, words the error line names besides the file)
HOSTILE_LORAS = [
    ("nan-down", _pair(down=_A * NAN), None, [f"{Q}.lora_A.weight", "non-finite"]),
    ("inf-up", _pair(up=_B * INF), None, [f"{Q}.lora_B.weight", "non-finite"]),
    ("rank-mismatch", _pair(up=torch.ones(32, 3)), None, [f"{Q}.lora_A.weight", f"{Q}.lora_B.weight", "rank"]),
    ("1-D", _pair(down=torch.ones(32), up=torch.ones(32)), None, [f"{Q}.lora_A.weight", "1-D"]),
    ("rank-0", _pair(down=torch.ones(0, 32), up=torch.ones(32, 0)), None, [f"{Q}.lora_A.weight", "empty"]),
    ("int-weights", _pair(down=torch.ones(4, 32, dtype=torch.int32)), None, [f"{Q}.lora_A.weight", "int32"]),
    ("vector-alpha", _pair(alpha=torch.ones(3)), None, [f"{Q}.alpha", "3 values"]),
    ("nan-alpha", _pair(alpha=torch.tensor(NAN)), None, [f"{Q}.alpha", "nan"]),
    ("inf-alpha", _pair(alpha=torch.tensor(INF)), None, [f"{Q}.alpha", "inf"]),
    ("zero-alpha", _pair(alpha=torch.tensor(0.0)), None, [f"{Q}.alpha", "positive"]),
    ("negative-alpha", _pair(alpha=torch.tensor(-4.0)), None, [f"{Q}.alpha", "positive"]),
    ("text-metadata-alpha", _pair(), _meta(lora_alpha="x"), ["lora_alpha", "'x'"]),
    ("infinite-metadata-alpha", _pair(), {"lora_adapter_metadata": '{"lora_alpha": 1e999}'}, ["lora_alpha", "inf"]),
    ("bool-metadata-alpha", _pair(), _meta(lora_alpha=True), ["lora_alpha", "True"]),
    (
        "nan-alpha-pattern",
        _pair(),
        {"lora_adapter_metadata": '{"alpha_pattern": {"to_q": NaN}}'},
        ["alpha_pattern", "nan"],
    ),
    ("bad-alpha-pattern", _pair(), _meta(alpha_pattern={"(": 2}), ["alpha_pattern", "'('"]),
    ("list-alpha-pattern", _pair(), _meta(alpha_pattern=[1]), ["alpha_pattern", "[1]"]),
    ("metadata-not-an-object", _pair(), {"lora_adapter_metadata": "[1, 2]"}, ["lora_adapter_metadata", "object"]),
    ("metadata-not-json", _pair(), {"lora_adapter_metadata": "{"}, ["lora_adapter_metadata", "JSON"]),
    ("kohya-nan", _pair(KOHYA, down=_A * NAN), None, [f"{KOHYA}.lora_down.weight", "non-finite"]),
    ("kohya-rank-mismatch", _pair(KOHYA, up=torch.ones(32, 2)), None, [f"{KOHYA}.lora_up.weight", "rank"]),
    ("kohya-vector-alpha", _pair(KOHYA, alpha=torch.ones(2, 2)), None, [f"{KOHYA}.alpha", "4 values"]),
]


@pytest.mark.parametrize("case", HOSTILE_LORAS, ids=[c[0] for c in HOSTILE_LORAS])
def test_hostile_lora_files_exit_2_with_one_line_naming_file_and_key(case, tiny_folder, tmp_path, capsys):
    name, tensors, metadata, words = case
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path, metadata=metadata)
    out = tmp_path / "out.safetensors"
    for argv in (
        ["convert", "--lora", str(path), "--to", "kohya", "--out", str(out)],
        ["convert", "--lora", str(path), "--to", "diffusers", "--out", str(out)],
        ["resize", "--lora", str(path), "--rank", "2", "--out", str(out)],
        ["merge", "--base", str(tiny_folder), "--lora", str(path), "--out", str(tmp_path / "merged")],
    ):
        exits_2(partial(main, argv), capsys, str(path), *words)
        assert not out.exists() and not (tmp_path / "merged").exists(), argv


def test_widths_that_cannot_fuse_into_kohya_modules_name_the_module(tmp_path, capsys):
    k = "transformer.transformer_blocks.0.attn.to_k"
    for name, tensors, words in (
        (
            "out-width",
            {**_pair(), **_pair(k, torch.ones(4, 32), torch.ones(16, 4))},
            ["transformer_blocks.0.attn.to_k", "16 wide"],
        ),
        (
            "in-width",
            {**_pair(), **_pair(k, torch.ones(4, 16), torch.ones(32, 4))},
            ["double_blocks_0_img_attn_qkv", "to_k 16"],
        ),
        (
            "mlp-width",
            {
                **_pair("transformer.single_transformer_blocks.0.attn.to_q"),
                **_pair("transformer.single_transformer_blocks.0.proj_mlp", torch.ones(4, 32), torch.ones(100, 4)),
            },
            ["single_transformer_blocks.0.proj_mlp", "100 wide"],
        ),
    ):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        exits_2(
            partial(main, ["convert", "--lora", str(path), "--to", "kohya", "--out", str(tmp_path / "o.safetensors")]),
            capsys,
            str(path),
            *words,
        )


def test_no_tool_writes_non_finite_weights(tiny_folder, tmp_path, capsys):
    """An alpha that overflows float16 when folded into its factor, and merge scales that are not
    finite or overflow the base's weights: refused, nothing written (they were written with exit 0)."""
    path = tmp_path / "f16.safetensors"
    save_file(_pair(down=_A.half(), up=_B.half(), alpha=torch.tensor(1e30)), path)
    out = tmp_path / "out.safetensors"
    for argv in (
        ["convert", "--lora", str(path), "--to", "diffusers", "--out", str(out)],
        ["resize", "--lora", str(path), "--rank", "2", "--out", str(out)],
    ):
        exits_2(partial(main, argv), capsys, f"--out {out}", str(path), "non-finite", "float16")
        assert not out.exists()
    fine = tmp_path / "fine.safetensors"
    save_file(_pair(), fine)
    merged = tmp_path / "merged"
    base = ["merge", "--base", str(tiny_folder), "--lora", str(fine), "--out", str(merged)]
    for scale in ("nan", "inf", "-inf"):
        exits_2(partial(main, base + [f"--scale={scale}"]), capsys, f"--scale {scale}", "finite")
    exits_2(
        partial(main, base + ["--scale", "1e300"]),
        capsys,
        f"--out {merged}",
        "transformer_blocks.0.attn.to_q.weight",
        "non-finite",
    )
    assert not merged.exists()


def test_out_is_never_the_input_and_an_existing_out_needs_overwrite(tmp_path, capsys):
    path = tmp_path / "in.safetensors"
    save_file(_pair(alpha=torch.tensor(8.0)), path)
    original = path.read_bytes()
    (tmp_path / "hard.safetensors").hardlink_to(path)
    (tmp_path / "sym.safetensors").symlink_to(path)
    for verb in (["convert", "--to", "comfyui"], ["resize", "--rank", "2"]):
        cmd = [verb[0], "--lora", str(path), *verb[1:]]
        for same in ("in", "hard", "sym"):
            out = tmp_path / f"{same}.safetensors"
            for extra in ([], ["--overwrite"]):
                exits_2(partial(main, cmd + ["--out", str(out), *extra]), capsys, f"--out {out}", "is the input file")
        assert path.read_bytes() == original
        exits_2(partial(main, cmd + ["--out", str(tmp_path)]), capsys, f"--out {tmp_path}", "folder")
        old = tmp_path / "old.safetensors"
        old.write_bytes(b"keep me")
        exits_2(partial(main, cmd + ["--out", str(old)]), capsys, f"--out {old}", "already exists", "--overwrite")
        assert old.read_bytes() == b"keep me"
        assert main(cmd + ["--out", str(old), "--overwrite"]) == 0
        assert read_lora(old).layout == "comfyui"
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # the storage error names --out (not the training options paths.output_dir / run_name)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = exits_2(
        lambda: main(["resize", "--lora", str(path), "--rank", "2", "--out", str(blocker / "x.safetensors")]),
        capsys,
        f"--out {blocker / 'x.safetensors'}",
    )
    assert "paths.output_dir" not in line and "run_name" not in line


def test_lora_tool_errors_are_one_line_from_the_command(tmp_path):
    """Real processes: a NaN file, and a read-only --out folder; stderr is that one line (no library
    warning such as bitsandbytes' CPU-kernel line either)."""
    from ..e2e.test_signals import _without_dac_override

    def run(prefix, *args):
        return subprocess.run(
            [*prefix, sys.executable, "-m", "flux_lightning.lora_tools", *args], capture_output=True, text=True
        )

    nan = tmp_path / "nan.safetensors"
    save_file(_pair(down=_A * NAN), nan)
    proc = run([], "convert", "--lora", str(nan), "--to", "kohya", "--out", str(tmp_path / "o.safetensors"))
    process_exits_2(proc, str(nan), f"{Q}.lora_A.weight")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    prefix = _without_dac_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: a chmod'ed dir would still be writable")
    path = tmp_path / "in.safetensors"
    save_file(_pair(), path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = run(prefix, "resize", "--lora", str(path), "--rank", "2", "--out", str(ro / "x.safetensors"))
    finally:
        ro.chmod(0o755)
    line = process_exits_2(proc, f"--out {ro / 'x.safetensors'}", "Permission denied")
    assert "paths.output_dir" not in line
    assert not list(ro.iterdir())


# -- resize: the alpha written matches the rank written (issue 23) ---------------------------------
def test_resize_above_a_matrix_side_keeps_the_strength(linears, pipe, tmp_path, capsys):
    """Rank-64 factors of 32-wide layers: the update has rank <= 32, so --rank 48 keeps 32 components
    and must write alpha 32 (it wrote 48: 1.5x too strong); ComfyUI's and diffusers' loaders apply it
    as the original update."""
    modules = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.1.proj_mlp",
    ]
    lora = random_lora(linears, rank=64, alpha=16.0, seed=5, modules=modules)
    path, out = tmp_path / "r64.safetensors", tmp_path / "r48.safetensors"
    write_lora(lora, "comfyui", path)
    assert main(["resize", "--lora", str(path), "--rank", "48", "--out", str(out)]) == 0
    assert "rank  64 -> 32 " in capsys.readouterr().out
    tensors = load_file(out)
    assert {tensors[f"transformer.{m}.alpha"].item() for m in modules} == {32.0}
    model = FluxTransformer2DModel.from_pretrained(pipe.config._name_or_path, subfolder="transformer")
    weights = {m: dict(model.named_modules())[m].weight.detach().clone() for m in modules}
    patched, not_loaded = comfyui_apply(tensors, model)
    assert not not_loaded
    for m, delta in deltas(lora).items():
        torch.testing.assert_close(patched[m], weights[m] + delta, atol=1e-5, rtol=1e-5, msg=m)
    reference = tmp_path / "reference.safetensors"
    write_lora(lora, "diffusers", reference)
    try:
        pipe.load_lora_weights(str(reference), adapter_name="reference")
        expected = _predict(pipe.transformer)
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(out), adapter_name="resized")
        torch.testing.assert_close(_predict(pipe.transformer), expected, atol=1e-5, rtol=1e-4)
    finally:
        pipe.unload_lora_weights()


# -- convert: a training run's checkpoint (issue 23) -------------------------------------------------
def test_convert_reads_the_lora_of_a_training_checkpoint(tiny_model_cfg, cache_root, tmp_path, capsys):
    """The LoRA of a Lightning checkpoint (read with weights_only) is the file the run's exporter writes;
    a damaged file or another adapter's checkpoint is one line."""
    from flux_lightning import AdapterConfig

    from ..conftest import fit_tiny

    module, _ = fit_tiny(
        tiny_model_cfg, cache_root, steps=2, lr=1e-2, adapter=AdapterConfig(rank=4, alpha=2.0, dropout=0.0)
    )
    ckpt = tmp_path / "last.ckpt"
    module.trainer.save_checkpoint(ckpt)
    exported = read_lora(module.export_adapter(tmp_path / "exported", dtype=torch.float32)).modules
    for to in ("diffusers", "kohya"):
        out = tmp_path / f"from-ckpt-{to}.safetensors"
        assert main(["convert", "--lora", str(ckpt), "--to", to, "--out", str(out)]) == 0
        assert "(checkpoint, 22 modules)" in capsys.readouterr().out
        converted = read_lora(out).modules
        assert any(mod.up.abs().max() > 1e-4 for mod in converted.values())  # trained: B moved off zero
        assert_same_deltas(deltas(converted), deltas(exported))
    lokr = tmp_path / "lokr.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"adapter": {"type": "lokr"}}}, lokr)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    nan = tmp_path / "nan.ckpt"
    state = {k: v * float("nan") for k, v in module.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams)}, nan)
    for path, words in (
        (lokr, ["adapter.type=lokr"]),
        (tmp_path / "junk.ckpt", ["not a readable Lightning checkpoint"]),
        (nan, ["non-finite"]),
    ):
        exits_2(
            partial(
                main, ["convert", "--lora", str(path), "--to", "diffusers", "--out", str(tmp_path / "o.safetensors")]
            ),
            capsys,
            str(path),
            *words,
        )
