"""More data sources (issue 15, item 6): alpha-channel loss masks (``mask_from_alpha``) and
``type: huggingface`` backends reading a local Hugging Face ``datasets`` dataset."""

import hashlib
import io
import json
import logging
import sys
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flux_lightning import AdapterConfig, FluxLoRAModule
from flux_lightning.data import DataError, DatasetConfig, FluxDataModule
from flux_lightning.data import datamodule as dm_mod
from flux_lightning.data.caching import _seed_of
from flux_lightning.data.config import ImageBackendConfig
from flux_lightning.data.encoding import encode_images
from flux_lightning.data.huggingface import source_problem
from flux_lightning.data.transforms import to_pixels
from flux_lightning.model.components import load_vae

from ..support.cli import flux_lightning

pytestmark = pytest.mark.usefixtures("one_thread")

RECTS = {"a": (12, 8, 44, 40), "b": (0, 20, 64, 52)}  # opaque box (x0, y0, x1, y1) of each 64x64 image


def _box(rect, size=64) -> np.ndarray:
    x0, y0, x1, y1 = rect
    box = np.zeros((size, size), np.uint8)
    box[y0:y1, x0:x1] = 255
    return box


def _rgba_folders(tmp_path):
    """RGBA images whose alpha is a known box (blue behind the transparent part, so compositing
    shows), and a mask folder holding the same boxes as grayscale files."""
    for name, rect in RECTS.items():
        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[..., :3] = (0, 0, 255)
        x0, y0, x1, y1 = rect
        rgba[y0:y1, x0:x1, :3] = (200, 40, 40) if name == "a" else (0, 90, 0)
        rgba[..., 3] = _box(rect)
        (tmp_path / "rgba").mkdir(exist_ok=True)
        (tmp_path / "mask").mkdir(exist_ok=True)
        Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba" / f"{name}.png")
        Image.fromarray(_box(rect)).save(tmp_path / "mask" / f"{name}.png")


def _dm(model_cfg, cache, backends, **kw):
    cfg = DatasetConfig(backends=backends, cache_dir=str(cache), caption_dropout_probability=0.0, batch_size=2, **kw)
    dm = FluxDataModule(cfg, model_cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _items(dm):
    return [dm.train_dataset.item(0, i) for i in range(len(dm.train_dataset))]


def test_alpha_mask_is_the_mask_a_mask_backend_gives_and_the_loss_ignores_the_transparent_part(
    tiny_model_cfg, tmp_path
):
    _rgba_folders(tmp_path)
    img = dict(instance_data_dir=str(tmp_path / "rgba"), resolution=64)
    alpha = _dm(tiny_model_cfg, tmp_path / "c", [ImageBackendConfig(id="img", mask_from_alpha=True, **img)])
    linked = _dm(
        tiny_model_cfg,
        tmp_path / "c",
        [
            ImageBackendConfig(id="img", conditioning_data="masks", **img),
            ImageBackendConfig(
                id="masks", dataset_type="conditioning", instance_data_dir=str(tmp_path / "mask"), resolution=64
            ),
        ],
    )
    assert [s.path.stem for s in alpha.train_dataset.samples] == ["a", "b"]
    for name, a, m in zip("ab", _items(alpha), _items(linked)):
        expected = F.avg_pool2d(torch.from_numpy(_box(RECTS[name])).float()[None, None] / 255.0, 8)[0]
        assert torch.equal(a["mask"], expected) and torch.equal(m["mask"], expected)  # same downsampling
        assert 0 < expected.mean() < 1 and ((expected > 0) & (expected < 1)).any()  # a box off the 8-px grid
        assert torch.equal(a["latents"], m["latents"])  # the pixels are composited on white either way
    # toggling the option never serves the other kind's entry: the alpha mask has its own key
    assert {s.mask_key for s in alpha.train_dataset.samples}.isdisjoint(
        s.mask_key for s in linked.train_dataset.samples
    )

    batch = next(iter(alpha.train_dataloader()))
    module = FluxLoRAModule(tiny_model_cfg, AdapterConfig(rank=2, dropout=0.0))
    module.configure_model()
    real_forward, dead = module.forward, batch["mask"] == 0
    losses = []
    for poison in (0.0, 100.0):  # change the prediction only where the alpha is 0
        module.forward = lambda *a, poison=poison, **k: real_forward(*a, **k) + poison * dead
        torch.manual_seed(0)
        losses.append(module.training_step(batch, 0).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_rgba_is_composited_on_white_by_default(tiny_model_cfg, tmp_path):
    _rgba_folders(tmp_path)
    dm = _dm(
        tiny_model_cfg,
        tmp_path / "c",
        [ImageBackendConfig(id="img", instance_data_dir=str(tmp_path / "rgba"), resolution=64)],
    )
    samples, items = dm.train_dataset.samples, _items(dm)
    assert all("mask" not in item and s.mask_key is None for s, item in zip(samples, items))
    pixels = []
    for s in samples:  # the transparent part (blue underneath) turns white
        rgba = np.asarray(Image.open(s.path))
        white = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
        pixels.append(to_pixels(Image.fromarray(white), s.placement))
    # one VAE call for both, as the cache encodes one bucket's images (vae_batch_size 4)
    expected = encode_images(load_vae(tiny_model_cfg), torch.stack(pixels), [_seed_of(s.latent_key) for s in samples])
    assert torch.equal(torch.stack([item["latents"] for item in items]), expected)


def test_mask_from_alpha_with_a_linked_mask_backend_is_refused(tmp_path):
    cfg = DatasetConfig(
        backends=[
            ImageBackendConfig(id="img", instance_data_dir=str(tmp_path), mask_from_alpha=True, conditioning_data="m"),
            ImageBackendConfig(id="m", dataset_type="conditioning", instance_data_dir=str(tmp_path)),
        ]
    )
    assert [p for p in cfg.problems() if "mask_from_alpha" in p] == [
        "dataset.backends[img].mask_from_alpha: the linked backend 'm' already gives the loss masks; use one: "
        "remove mask_from_alpha, or the conditioning_data link"
    ]
    shorthand = DatasetConfig(instance_data_dir=str(tmp_path), mask_from_alpha=True)
    assert shorthand.image_backends()[0].mask_from_alpha and not shorthand.problems()


# -- type: huggingface --------------------------------------------------------------------------


def _png(colour, size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


ROWS = [  # (image bytes, caption); row 4 cannot be decoded
    (_png((200, 40, 40), (64, 64)), "a red square"),
    (_png((0, 90, 0), (128, 64)), "a green strip"),
    (_png((0, 0, 200), (64, 64)), "a blue square"),
    (_png((90, 90, 0), (128, 64)), "an olive strip"),
    (b"not an image", "broken"),
]
LEFT_HALF = np.zeros((64, 128), np.uint8)
LEFT_HALF[:, :32] = 255


def _hf_dataset(tmp_path):
    """The rows saved with save_to_disk and as a parquet file; each row's mask trains its left 32 pixels."""
    datasets = pytest.importorskip("datasets")
    masks = [
        Image.fromarray(LEFT_HALF[:, : Image.open(io.BytesIO(b)).size[0]] if i < 4 else LEFT_HALF)
        for i, (b, _) in enumerate(ROWS)
    ]
    features = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"), "m": datasets.Image()})
    rows = datasets.Dataset.from_dict(
        {"img": [{"bytes": b, "path": None} for b, _ in ROWS], "text": [c for _, c in ROWS], "m": masks},
        features=features,
    )
    rows.save_to_disk(str(tmp_path / "saved"))
    rows.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    return tmp_path / "saved", tmp_path / "pq"


def test_huggingface_dataset_trains_with_buckets_captions_masks_and_reports_a_bad_row(
    tiny_model_cfg, tmp_path, caplog, monkeypatch
):
    saved, parquet = _hf_dataset(tmp_path)
    backend = ImageBackendConfig(
        id="hf",
        type="huggingface",
        dataset_name=str(saved),
        caption_strategy="huggingface",
        image_column="img",
        caption_column="text",
        mask_column="m",
        resolution=64,
        resolution_type="pixel",
    )
    with caplog.at_level(logging.WARNING):
        dm = _dm(tiny_model_cfg, tmp_path / "c", [backend])
    assert dm.skipped == 1 and f"skipping {saved} row 4 (column 'img'): cannot read image" in caplog.text
    samples = dm.train_dataset.samples
    assert [s.caption for s in samples] == [c for _, c in ROWS[:4]]
    assert [s.source for s in samples] == [hashlib.sha1(b).hexdigest() for b, _ in ROWS[:4]]  # keyed by content
    buckets = {g.bucket: len(g.indices) for g in dm.groups()}
    assert buckets == {(64, 64): 2, (128, 64): 2}  # squares and 2:1 strips
    for s, item in zip(samples, _items(dm)):
        w, h = s.placement.bucket
        assert item["latents"].shape == (16, h // 8, w // 8)
        assert item["mask"].sum() > 0 and item["mask"][..., -1].sum() == 0  # the right edge is masked out
        text = dm.text_cache.load(dm.text_key(s.caption))
        assert torch.equal(item["prompt_embeds"], text["prompt_embeds"])

    # the same rows as parquet, from a multidatabackend.json: the same cache entries, nothing re-encoded
    doc = [
        {
            "id": "hf",
            "type": "huggingface",
            "dataset_name": str(parquet),
            "caption_strategy": "huggingface",
            "metadata_backend": "huggingface",
            "image_column": "img",
            "caption_column": "text",
            "mask_column": "m",
            "resolution": 64,
            "resolution_type": "pixel",
        }
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(doc))
    monkeypatch.setattr(dm_mod, "load_vae", lambda *a, **k: pytest.fail("the VAE was loaded: the cache was not reused"))
    again = _dm(tiny_model_cfg, tmp_path / "c", [], backend_file=str(tmp_path / "multidatabackend.json"))
    assert [s.latent_key for s in again.train_dataset.samples] == [s.latent_key for s in samples]
    assert [s.mask_key for s in again.train_dataset.samples] == [s.mask_key for s in samples]

    L.seed_everything(0)
    module = FluxLoRAModule(
        tiny_model_cfg, AdapterConfig(rank=2, dropout=0.0), optimizer=partial(torch.optim.AdamW, lr=1e-3)
    )
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, again)
    assert trainer.global_step == 3 and np.isfinite(module.recent_train_loss())


def test_huggingface_hub_ids_bad_columns_and_a_missing_library_are_refused(tiny_model_cfg, tmp_path, monkeypatch):
    hub = ImageBackendConfig(id="hf", type="huggingface", dataset_name="someone/photos", caption_strategy="huggingface")
    assert not hub.problems()
    assert "never downloaded" in source_problem(hub) and "save_to_disk" in source_problem(hub)
    with pytest.raises(DataError, match="never downloaded"):
        FluxDataModule(DatasetConfig(backends=[hub], cache_dir=str(tmp_path / "c")), tiny_model_cfg).samples()
    assert ImageBackendConfig(id="x", type="huggingface", dataset_name="d").problems() == [
        "dataset.backends[x].caption_strategy: 'filename' does not apply to type: huggingface; use huggingface "
        "(caption_column) or instanceprompt"
    ]
    assert ImageBackendConfig(id="z", instance_data_dir="x", mask_column="m").problems() == [
        "dataset.backends[z].mask_column: is used by type: huggingface only; remove it (this backend is type: local)"
    ]
    saved, _ = _hf_dataset(tmp_path)
    wrong = ImageBackendConfig(id="hf", type="huggingface", dataset_name=str(saved), caption_strategy="huggingface")
    with pytest.raises(
        DataError, match=r"dataset.backends\[hf\].image_column: .* has no column 'image' \(its columns: img, text, m\)"
    ):
        FluxDataModule(DatasetConfig(backends=[wrong], cache_dir=str(tmp_path / "c")), tiny_model_cfg).samples()
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    assert 'pip install "flux-lightning[huggingface]"' in source_problem(wrong)
    with pytest.raises(DataError, match=r'pip install "flux-lightning\[huggingface\]"'):
        FluxDataModule(DatasetConfig(backends=[wrong], cache_dir=str(tmp_path / "c")), tiny_model_cfg).samples()


# -- hostile type: huggingface sources: exit 2, one line naming the file (issue 23) ------------------
def _hostile_sources(tmp_path) -> list[tuple[str, str, str]]:
    """(id, dataset_name, the file or folder the error must name) for damaged local datasets."""
    import shutil

    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")})
    good = datasets.Dataset.from_dict(
        {"img": [{"bytes": b, "path": None} for b, _ in ROWS[:4]] * 5, "text": [c for _, c in ROWS[:4]] * 5},
        features=features,
    )
    empty = datasets.Dataset.from_dict({"img": [], "text": []}, features=features)
    empty.save_to_disk(str(tmp_path / "empty-saved"))
    good.save_to_disk(str(tmp_path / "bad-arrow"))
    for arrow in (tmp_path / "bad-arrow").glob("*.arrow"):
        arrow.write_bytes(b"junk")
    good.save_to_disk(str(tmp_path / "bad-state"))
    (tmp_path / "bad-state" / "state.json").write_text("{")
    empty.to_parquet(str(tmp_path / "no-rows" / "e.parquet"))
    good.to_parquet(str(tmp_path / "good.parquet"))
    data = (tmp_path / "good.parquet").read_bytes()
    for name, content in (("zero-byte", b""), ("truncated", data[: len(data) // 2]), ("text", b"hello")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.parquet").write_bytes(content)
    (tmp_path / "glob").mkdir()
    shutil.copy(tmp_path / "good.parquet", tmp_path / "glob" / "a.parquet")
    (tmp_path / "glob" / "b.parquet").write_bytes(b"PAR1 not really")
    pages = bytearray(data)  # footer intact, data pages overwritten
    pages[64 : len(pages) // 2] = b"A" * (len(pages) // 2 - 64)
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "p.parquet").write_bytes(bytes(pages))
    return [
        ("empty-saved-dataset", str(tmp_path / "empty-saved"), str(tmp_path / "empty-saved")),
        ("damaged-arrow-file", str(tmp_path / "bad-arrow"), str(tmp_path / "bad-arrow")),
        ("damaged-state-json", str(tmp_path / "bad-state"), str(tmp_path / "bad-state")),
        ("parquet-without-rows", str(tmp_path / "no-rows"), str(tmp_path / "no-rows")),
        ("zero-byte-parquet", str(tmp_path / "zero-byte" / "x.parquet"), str(tmp_path / "zero-byte" / "x.parquet")),
        ("truncated-parquet", str(tmp_path / "truncated"), str(tmp_path / "truncated" / "x.parquet")),
        ("text-named-parquet", str(tmp_path / "text"), str(tmp_path / "text" / "x.parquet")),
        ("glob-with-a-bad-file", str(tmp_path / "glob" / "*.parquet"), str(tmp_path / "glob" / "b.parquet")),
        ("damaged-data-pages", str(tmp_path / "pages"), str(tmp_path / "pages")),
    ]


def _backend_file(tmp_path, dataset_name):
    doc = [
        {
            "id": "hf",
            "type": "huggingface",
            "dataset_name": dataset_name,
            "caption_strategy": "huggingface",
            "metadata_backend": "huggingface",
            "image_column": "img",
            "caption_column": "text",
        }
    ]
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(doc))
    return path


def test_hostile_huggingface_sources_exit_2_with_one_line_naming_the_file(
    tiny_folder, cache_root, tmp_path, monkeypatch, capsys
):
    """Each through train.main in this process (the command's code path, no subprocess per case)."""
    from flux_lightning.run.train import main

    from ..support.hostile import exits_2

    monkeypatch.chdir(tmp_path)
    for name, dataset_name, named in _hostile_sources(tmp_path / "data"):
        backend_file = _backend_file(tmp_path, dataset_name)
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "prog",
                f"dataset.backend_file={backend_file}",
                f"paths.cache_dir={cache_root}",
                f"paths.output_dir={tmp_path / 'runs'}",
                f"run_name={name}",
                "callbacks.validation=null",
            ],
        )
        exits_2(main, capsys, "dataset.backends[hf].dataset_name", named)


def test_a_hostile_huggingface_glob_is_one_line_from_the_command(tiny_folder, cache_root, tmp_path):
    import os
    import subprocess

    from ..conftest import REPO
    from ..support.hostile import process_exits_2

    sources = {name: (dataset_name, named) for name, dataset_name, named in _hostile_sources(tmp_path / "data")}
    dataset_name, named = sources["glob-with-a-bad-file"]
    cmd = flux_lightning(
        f"dataset.backend_file={_backend_file(tmp_path, dataset_name)}",
        f"paths.cache_dir={cache_root}",
        f"paths.output_dir={tmp_path / 'runs'}",
    )
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    process_exits_2(proc, "dataset.backends[hf].dataset_name", named)
