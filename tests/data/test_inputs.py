"""Inputs read right or named: deep and palette images, caption encodings, every file of a
data folder used or reported, size guards from the header, typed backend files, unique validation names."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flux_lightning.callbacks import validation
from flux_lightning.callbacks.clip_score import summarize
from flux_lightning.config.validation import ConfigError
from flux_lightning.data import DataError, caching
from flux_lightning.data import datamodule as dm_mod
from flux_lightning.data.backend_file import load_backend_file
from flux_lightning.data.config import ImageBackendConfig
from flux_lightning.data.discovery import discover
from flux_lightning.data.transforms import load_mask, load_rgb

from ..conftest import REPO, make_datamodule
from ..support.cli import flux_lightning


def _rgb(path, size=(64, 64), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _mean(path) -> float:
    return float(np.asarray(load_rgb(path), dtype=np.float64).mean())


# -- pixels -------------------------------------------------------------------------------------
def test_deep_images_are_scaled_by_their_bit_depth(tmp_path):
    dark16 = np.full((8, 8), 200, np.uint16)  # 200 of 65535: nearly black
    Image.fromarray(dark16).save(tmp_path / "dark16.png")  # opens as I;16
    Image.fromarray(dark16).save(tmp_path / "dark16.pgm")  # opens as I (16-bit PGM)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "mid16.tif")
    Image.fromarray(np.full((8, 8), 2**30, np.int32)).save(tmp_path / "half32.tif")  # I, BitsPerSample 32
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "half.tif")  # F in [0, 1]
    assert _mean(tmp_path / "dark16.png") == pytest.approx(1, abs=0.5)
    assert _mean(tmp_path / "dark16.pgm") == pytest.approx(1, abs=0.5)
    assert _mean(tmp_path / "mid16.tif") == pytest.approx(40000 / 65535 * 255, abs=0.5)
    assert _mean(tmp_path / "half32.tif") == pytest.approx(127.5, abs=0.6)
    assert _mean(tmp_path / "half.tif") == pytest.approx(127.5, abs=0.6)
    # a 16-bit mask: full white trains everywhere, 200/65535 is (nearly) ignored
    from flux_lightning.data.buckets import fit

    placement = fit((8, 8), (8, 8))
    assert float(load_mask(tmp_path / "dark16.png", (8, 8), placement).max()) < 0.01


def test_palette_and_alpha_images_keep_their_colours(tmp_path):
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 120, 230] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    pal.save(tmp_path / "pal_t.png", transparency=1)  # index 1 is transparent -> white
    pal.save(tmp_path / "pal.gif")
    Image.new("LA", (8, 8), (50, 255)).save(tmp_path / "la.png")
    Image.new("LA", (8, 8), (50, 0)).save(tmp_path / "la_clear.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    colour = lambda name: tuple(np.asarray(load_rgb(tmp_path / name))[0, 0])  # noqa: E731
    assert colour("pal.png") == (10, 120, 230) and colour("pal.gif") == (10, 120, 230)
    assert colour("pal_t.png") == (255, 255, 255)
    assert colour("la.png") == (50, 50, 50) and colour("la_clear.png") == (255, 255, 255)
    assert colour("rgba.png") == (255, 255, 255)


def test_animated_gif_trains_on_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = np.asarray(load_rgb(tmp_path / "anim.gif")).reshape(-1, 3).mean(0)
    assert r > 200 and b < 50


# -- captions -----------------------------------------------------------------------------------
def test_caption_encodings(tmp_path, caplog):
    d = tmp_path / "d"
    for name, data in [
        ("latin", "café crème à la française".encode("latin-1")),
        ("bom", "\ufeffa caption after a BOM".encode("utf-8")),
        ("utf16", "ünïcode in UTF-16".encode("utf-16")),
        ("plain", "naïve UTF-8".encode()),
    ]:
        _rgb(d / f"{name}.png")
        (d / f"{name}.txt").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        records, skipped = discover(ImageBackendConfig(caption_strategy="textfile"), [str(d)])
    captions = {r.path.stem: r.caption for r in records}
    assert captions == {
        "latin": "café crème à la française",
        "bom": "a caption after a BOM",
        "utf16": "ünïcode in UTF-16",
        "plain": "naïve UTF-8",
    }
    warned = [r.message for r in caplog.records if "not UTF-8" in r.message]
    assert len(warned) == 1 and "latin.txt" in warned[0] and "Windows-1252" in warned[0]


def test_csv_metadata_in_a_legacy_encoding(tmp_path, caplog):
    d = tmp_path / "d"
    _rgb(d / "x.png")
    (d / "metadata.csv").write_bytes("filename,caption\r\nx.png,smörgåsbord\r\n".encode("cp1252"))
    with caplog.at_level(logging.WARNING):
        records, _ = discover(ImageBackendConfig(caption_strategy="csv"), [str(d)])
    assert [r.caption for r in records] == ["smörgåsbord"] and "metadata.csv is not UTF-8" in caplog.text


# -- what a folder holds -----------------------------------------------------------------------
def test_every_file_in_a_data_folder_is_used_or_reported(tmp_path, caplog):
    d, outside = tmp_path / "d", tmp_path / "elsewhere"
    _rgb(d / "a.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(d / "b.tif")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(d / "c.gif")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(d / "e.bmp")
    (d / "f.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    _rgb(d / ".hidden.png")
    (d / ".DS_Store").write_bytes(b"\x00")
    (d / "notes.md").write_text("# my dataset")
    (d / "orphan.txt").write_text("a caption whose image was deleted")
    (d / "a.txt").write_text("a caption")
    (d / "aspect_ratio_bucket_indices.json").write_text("{}")  # SimpleTuner's index: belongs here
    _rgb(outside / "linked.png")
    os.symlink(outside, d / "link")  # a symlinked folder is followed
    os.symlink(d, d / "loop")  # a loop is reported, not followed forever
    with caplog.at_level(logging.WARNING):
        records, skipped = discover(ImageBackendConfig(id="b"), [str(d)])
    assert sorted(r.relative for r in records) == ["a.png", "b.tif", "c.gif", "e.bmp", "link/linked.png"]
    assert len(skipped) == 2
    text = caplog.text
    assert "f.heic: unsupported image format .heic" in text and ".hidden.png: hidden file" in text
    unused = next(r.message for r in caplog.records if "not used" in r.message)
    for name in (
        "notes.md",
        "orphan.txt (caption file without an image",
        ".DS_Store (hidden file)",
        "loop (symlinked folder",
    ):
        assert name in unused, name
    assert "a.txt" not in text and "aspect_ratio_bucket" not in text


def test_tiny_images_are_skipped_by_default(tiny_model_cfg, tmp_path, caplog):
    d = tmp_path / "d"
    _rgb(d / "one_pixel.png", size=(1, 1))
    _rgb(d / "thumb.png", size=(12, 40))  # 12 < 64 / 4
    _rgb(d / "fine.png", size=(16, 40))
    with caplog.at_level(logging.WARNING):
        dm = make_datamodule(tiny_model_cfg, tmp_path / "c", instance_data_dir=str(d))  # resolution 64
        assert [s.path.name for s in dm.samples()] == ["fine.png"] and dm.skipped == 2
    assert "one_pixel.png: 1x1 is below dataset.minimum_image_size=16" in caplog.text
    bigger = make_datamodule(tiny_model_cfg, tmp_path / "c", instance_data_dir=str(d), minimum_image_size=30)
    assert bigger.samples() == [] and bigger.skipped == 3
    # no minimum at all: a backend without minimum_image_size still skips what is below one latent patch
    backend = ImageBackendConfig(id="b", instance_data_dir=str(d), resolution=64)
    dm = dm_mod.FluxDataModule(dm_mod.DatasetConfig(backends=[backend], cache_dir=str(tmp_path / "c")), tiny_model_cfg)
    assert sorted(s.path.name for s in dm.samples()) == ["fine.png"]
    assert "thumb.png: 12x40 is smaller than one 16x16 latent patch" in caplog.text


def test_extreme_aspect_ratio_is_skipped_from_the_header(tiny_model_cfg, tmp_path, caplog, monkeypatch):
    d = tmp_path / "d"
    _rgb(d / "ok.png", size=(64, 64))
    Image.new("L", (1_000_000, 10)).save(d / "strip.png")  # ~10 kB on disk, GBs once resized for a bucket
    assert (d / "strip.png").stat().st_size < 100_000
    monkeypatch.setattr(caching, "load_rgb", lambda path: pytest.fail(f"decoded {path}"))
    with caplog.at_level(logging.WARNING):
        dm = make_datamodule(tiny_model_cfg, tmp_path / "c", instance_data_dir=str(d))
        assert [s.path.name for s in dm.samples()] == ["ok.png"] and dm.skipped == 1
    assert "strip.png: 1000000x10 has an aspect ratio of 1e+05:1, beyond dataset.max_aspect_ratio=8" in caplog.text
    (d / "strip.png").unlink()
    _rgb(d / "band.png", size=(400, 20))  # 20:1
    assert [
        s.path.name for s in make_datamodule(tiny_model_cfg, tmp_path / "c", instance_data_dir=str(d)).samples()
    ] == ["ok.png"]
    wide = make_datamodule(tiny_model_cfg, tmp_path / "c", instance_data_dir=str(d), max_aspect_ratio=20)
    assert len(wide.samples()) == 2  # the limit is a setting


# -- multidatabackend.json ----------------------------------------------------------------------
BAD_JSON = [
    {"id": "x", "instance_data_dir": 5, "resolution": "big", "repeats": "2", "probability": None, "crop": "no"},
    {"id": "ok", "instance_data_dir": "folder", "crop_aspect_buckets": [1.0, "wide"]},
    {"id": "text", "dataset_type": "text_embeds", "write_batch_size": 1.5, "default": "yes"},
]
BAD_LINES = [
    "backend 'x': instance_data_dir=5 must be a folder path (a string) or a list of them",
    "backend 'x': resolution=\"big\" must be a number",
    "backend 'x': repeats=\"2\" must be an integer; write 2 (no quotes)",
    "backend 'x': probability=null must be a number; give a value or leave the key out",
    "backend 'x': crop=\"no\" must be true or false; write false (no quotes)",
    "backend 'ok': crop_aspect_buckets=[1.0, \"wide\"] must be a list of numbers or null",
    "backend 'text': write_batch_size=1.5 must be an integer",
    "backend 'text': default=\"yes\" must be true or false; write true (no quotes)",
]


def test_backend_file_values_are_type_checked_all_at_once(tmp_path):
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(BAD_JSON))
    with pytest.raises(DataError) as err:
        load_backend_file(path)
    lines = str(err.value).split("\n  - ")
    assert len(lines) == len(BAD_LINES)
    for line, expected in zip(lines, BAD_LINES):
        assert line.startswith(f"dataset.backend_file: {path}: ") and expected in line


def test_bad_backend_file_on_the_command_line_is_one_error_per_value(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD_JSON))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        flux_lightning(f"dataset.backend_file={path}", f"paths.output_dir={tmp_path}/run"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "TypeError" not in out.stderr
    for expected in BAD_LINES:
        assert expected in out.stderr, expected
    assert "single-folder shorthand" not in out.stderr  # the default dataset's resolution is ignored, not an error


# -- validation names ---------------------------------------------------------------------------
def test_validation_names_are_unique_and_stable(tmp_path):
    nicks = ["dog 1", "dog_1", "dog/1", "Cat", "cat", "plain", "x" * 300, ""]
    names = validation.unique_names(nicks)
    assert len(set(names.values())) == len(nicks)
    assert len({n.lower() for n in names.values()}) == len(nicks)  # case-insensitive disks too
    assert names["dog_1"] == "dog_1" and names["plain"] == "plain"
    assert names["dog 1"].startswith("dog_1-") and names["dog/1"].startswith("dog_1-")
    assert all(len(n) <= 90 and "/" not in n and " " not in n for n in names.values())
    assert validation.unique_names(list(reversed(nicks))) == names  # not order-dependent: stable across runs
    # the CLIP metric keys follow the file names, so TensorBoard cannot merge two prompts
    metrics = summarize([1.0, 2.0], [names["dog 1"], names["dog_1"]])
    assert len([k for k in metrics if k.startswith("clip/prompt/")]) == 2


def test_validation_callback_writes_one_file_per_prompt(tmp_path):
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"dog 1": "a dog", "dog_1": "another dog"}))
    cb = validation.ValidationImages(str(tmp_path / "v"), user_prompt_library=str(library), validation_resolution=64)
    assert len(set(cb.names.values())) == 2
    library.write_text(json.dumps({"<token> dog": "a dog", "sks dog": "another dog"}))
    with pytest.raises(ConfigError, match="two prompts have the nickname 'sks dog'"):
        validation.prompt_library(None, str(library), "sks")
    library.write_text('{"dog": "a dog", "dog": "a second dog"}')
    with pytest.raises(ConfigError, match=r"\['dog'\] appear twice"):
        validation.prompt_library(None, str(library), None)
    library.write_text(json.dumps({"validation": "a dog"}))
    with pytest.raises(ConfigError, match="nickname 'validation'"):
        validation.prompt_library("a cat", str(library), None)


def test_unreadable_or_oversized_reference_images_are_skipped(cache_root, tmp_path, caplog):
    from flux_lightning import DatasetConfig, FluxDataModule

    from ..support.helpers import tiny_cfg

    images, refs = tmp_path / "images", tmp_path / "refs"
    for name in ("good", "garbage", "strip"):
        _rgb(images / f"{name}.png")
    _rgb(refs / "good.png")
    (refs / "garbage.png").write_bytes(b"not a png")
    Image.new("L", (1_000_000, 10)).save(refs / "strip.png")
    cfg = DatasetConfig(
        instance_data_dir=str(images),
        conditioning_data_dir=str(refs),
        resolution=64,
        batch_size=1,
        cache_dir=str(tmp_path / "cache"),
    )
    with caplog.at_level(logging.WARNING):
        dm = FluxDataModule(cfg, tiny_cfg(cache_root, "kontext"))
        assert [s.path.name for s in dm.samples()] == ["good.png"] and dm.skipped == 2
    assert "garbage.png: cannot read image" in caplog.text and "max_aspect_ratio" in caplog.text


# -- hostile values, table-driven: exit 2, the field or file named, one line per problem, no traceback --
def _hostile(tmp_path, cases: list[list[str]]) -> list[dict]:
    """Each case's exit code and stderr (tests/support/hostile_cli.py: one process for the whole table)."""
    common = [f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache", "callbacks.clip_score=null"]
    (tmp_path / "cases.json").write_text(json.dumps([[*common, *case] for case in cases]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "support" / "hostile_cli.py"),
            str(tmp_path / "cases.json"),
            str(tmp_path / "out.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def _assert_named(case, result, named: str) -> None:
    err = result["stderr"]
    assert "Traceback" not in err, (case, err[-2000:])
    assert result["code"] == 2, (case, result["code"], err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert all(line.startswith("  - ") for line in lines[first + 1 :]), (case, err)  # one line per problem
    assert named in err, (case, named, err)


def test_hostile_command_line_values_are_named_without_a_traceback(tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    table = [  # (overrides, what the error must name)
        (["adapter.rank=abc"], "adapter.rank"),
        (["adapter.rank=-4"], "adapter.rank"),
        (["adapter.rank=0"], "adapter.rank"),
        (["adapter.rank=1e30"], "adapter.rank"),
        (["adapter.rank=nan"], "adapter.rank"),
        (["adapter.rank=[1,2]"], "adapter.rank"),
        (["adapter.rank={a:{b:{c:{d:{e:1}}}}}"], "adapter.rank"),
        (["adapter.rank="], "adapter.rank"),
        (["optimizer.lr=nan"], "optimizer.lr"),
        (["optimizer.lr=inf"], "optimizer.lr"),
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["optimizer.lr=1e999"], "optimizer.lr"),
        (["optimizer.lr=abc"], "optimizer.lr"),
        (["trainer.max_steps=-5"], "trainer.max_steps"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["dataset.resolution=17"], "resolution"),
        (["dataset.resolution=-64"], "resolution"),
        (["dataset.resolution=abc"], "dataset.resolution"),
        (["dataset.batch_size=0"], "batch_size"),
        (["seed=abc"], "seed"),
        (["timesteps.sigmoid_scale=nan"], "timesteps.sigmoid_scale"),
        (["loss.huber_c=-1"], "huber_c"),
        (["callbacks.model_checkpoint.every_n_train_steps=-1"], "every_n_train_steps"),
        (["dataset=local", "dataset.instance_data_dir=/does/not/exist"], "/does/not/exist"),
        (["dataset=local", f"dataset.instance_data_dir={a_file}"], str(a_file)),
        (["model.pretrained_model_name_or_path=/does/not/exist"], "/does/not/exist"),
        ([f"model.pretrained_model_name_or_path={a_file}"], str(a_file)),
        (["resume_from_checkpoint=/does/not/exist.ckpt"], "resume_from_checkpoint"),
        (['tread.routes=[1,"x"]'], "tread.routes[0]"),
        (["tread.routes=[{bogus:1}]"], "tread.routes[...].bogus"),
        (["tread.routes=[{selection_ratio:x,start_layer_idx:1,end_layer_idx:2}]"], "tread.routes[...].selection_ratio"),
        (["tread.routes=5"], "tread.routes"),
        (["adapter.rnk=3"], "adapter.rnk"),
        (["+adapter.rnk=3"], "rnk"),
        (["+nonsense=1"], "nonsense"),
        (["model=nope"], "model/nope"),
        (["adapter.rank=["], "adapter.rank=["),
        (["resume.allow_changes=5"], "resume.allow_changes"),
        (["dataset.backend_file=/does/not/exist.json"], "/does/not/exist.json"),
        ([f"dataset.backend_file={tmp_path}"], str(tmp_path)),
    ]
    for (case, named), result in zip(table, _hostile(tmp_path, [c for c, _ in table])):
        _assert_named(case, result, named)


def test_hostile_backend_files_are_named_without_a_traceback(tmp_path):
    images = tmp_path / "images"
    _rgb(images / "a.png")
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    ok = {"id": "a", "instance_data_dir": str(images), "resolution": 64}
    deep = "[" * 5000 + "1" + "]" * 5000
    table = [  # (file content, what the error must name besides the file)
        ("", "not valid JSON"),
        ("{not json", "not valid JSON"),
        ("5", ""),
        ('{"id": "a"}', ""),
        ('[5, "x"]', ""),
        (json.dumps([{**ok, "resolution": float("nan")}]), "resolution"),
        (json.dumps([{**ok, "resolution": float("inf")}]), "resolution"),
        (json.dumps([{**ok, "resolution": -64}]), "resolution"),
        (json.dumps([{**ok, "resolution": 1e30}]), "resolution"),
        (json.dumps([{**ok, "repeats": -1}]), "repeats"),
        (json.dumps([{**ok, "id": ""}]), "id"),
        (json.dumps([{**ok, "instance_data_dir": "/does/not/exist"}]), "/does/not/exist"),
        (json.dumps([{**ok, "instance_data_dir": str(a_file)}]), str(a_file)),
        (json.dumps([{**ok, "instance_data_dir": ""}]), "instance_data_dir"),
        (json.dumps([{**ok, "crop_aspect_buckets": [[[[1.0]]]]}]), "crop_aspect_buckets"),
        (json.dumps([{**ok, "resolution": {"a": {"b": 1}}}]), "resolution"),
        (deep, ""),
        (json.dumps([]), ""),
    ]
    cases = []
    for i, (content, _) in enumerate(table):
        path = tmp_path / f"backends{i}.json"
        path.write_text(content)
        cases.append([f"dataset.backend_file={path}"])
    for (content, named), case, result in zip(table, cases, _hostile(tmp_path, cases)):
        _assert_named(content[:80], result, named)
        named_where = case[0].split("=", 1)[1] in result["stderr"] or "dataset.backends[" in result["stderr"]
        assert named_where, (content[:80], result["stderr"])  # the file, or the backend's field in it


def test_caption_files_may_be_txt_or_caption(tmp_path):
    d = tmp_path / "imgs"
    _rgb(d / "a.png"), _rgb(d / "b.png"), _rgb(d / "c.png")
    (d / "a.caption").write_text("from a caption file")
    (d / "b.txt").write_text("from a txt file")
    (d / "b.caption").write_text("the txt wins")
    (d / "orphan.caption").write_text("no image")
    records, skipped = discover(ImageBackendConfig(id="x", instance_data_dir=str(d), caption_strategy="textfile"))
    assert {r.path.name: r.caption for r in records} == {"a.png": "from a caption file", "b.png": "from a txt file"}
    assert [(s.path.name, s.reason) for s in skipped] == [
        ("c.png", "caption_strategy=textfile but c.txt is missing (a .caption file would do too)")
    ]  # neither file


def test_an_open_clip_model_without_open_clip_names_the_extra(monkeypatch):
    from flux_lightning.callbacks.clip_score import load_clip

    monkeypatch.setitem(sys.modules, "open_clip", None)  # not installed
    with pytest.raises(ImportError, match=r'pip install "flux-lightning\[open_clip\]"'):
        load_clip("open_clip:ViT-L-14", "openai")


def _png_header_only(path, w: int, h: int) -> None:
    """A PNG that declares ``w x h`` (its header) without the pixel data: what a size check reads."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("w,h", [(12000, 8000), (14000, 13000)])  # 96 MP; 182 MP, beyond PIL's own bomb error
def test_a_huge_image_is_called_larger_than_max_image_pixels(tiny_model_cfg, tmp_path, caplog, w, h):
    d = tmp_path / "d"
    _rgb(d / "ok.png", size=(64, 64))
    _png_header_only(d / "huge.png", w, h)
    with caplog.at_level(logging.WARNING):
        dm = make_datamodule(tiny_model_cfg, tmp_path / "c", instance_data_dir=str(d))
        assert [s.path.name for s in dm.samples()] == ["ok.png"] and dm.skipped == 1
    assert f"huge.png: {w}x{h} exceeds dataset.max_image_pixels=89478485" in caplog.text
    assert "truncated" not in caplog.text and "cannot read" not in caplog.text
