"""Aspect buckets and the bucketed, weighted, distributed, resumable batch sampler."""

from collections import Counter

import lightning as L
import pytest

from flux_lightning.data.buckets import bucket_size, place
from flux_lightning.data.config import ImageBackendConfig
from flux_lightning.data.sampler import BucketBatchSampler, Group


def _backend(**kw):
    return ImageBackendConfig(id="b", instance_data_dir="x", **kw)


@pytest.mark.parametrize(
    "size,kw,bucket",
    [
        ((1280, 1024), dict(resolution=1024, resolution_type="pixel_area"), (1152, 896)),
        ((1024, 1280), dict(resolution=1024, resolution_type="pixel_area"), (896, 1152)),
        ((1000, 1000), dict(resolution=1024, resolution_type="pixel_area"), (1024, 1024)),
        ((1600, 900), dict(resolution=512, resolution_type="pixel"), (896, 512)),
        ((900, 1600), dict(resolution=512, resolution_type="pixel"), (512, 896)),
        ((2000, 1000), dict(resolution=1.0, resolution_type="area"), (1472, 704)),
        ((2000, 1000), dict(resolution=512, crop=True, crop_aspect="square"), (512, 512)),
        (
            (2000, 1000),
            dict(resolution=512, crop=True, crop_aspect="closest", crop_aspect_buckets=[1.0, 1.5, 0.75]),
            (640, 448),
        ),
    ],
)
def test_bucket_shapes(size, kw, bucket):
    p = place(size, _backend(**kw), key="img.png")
    assert p.bucket == bucket
    bw, bh = p.bucket
    if not (kw.get("crop_aspect") == "square"):
        assert bw % 64 == 0 and bh % 64 == 0
    # the resize covers the bucket, keeps the aspect (to rounding) and the box is the bucket
    rw, rh = p.resize
    assert rw >= bw and rh >= bh and abs(rw / rh - size[0] / size[1]) < 0.01
    l, t, r, b = p.box
    assert (r - l, b - t) == p.bucket and r <= rw and b <= rh


def test_pixel_area_buckets_keep_the_area():
    cfg = _backend(resolution=1024, resolution_type="pixel_area")
    for aspect in (0.5, 0.75, 1.0, 1.33, 1.78, 2.0):
        w, h = bucket_size(aspect, cfg)
        assert abs(w * h / 1024**2 - 1) < 0.12
        assert abs(w / h - aspect) / aspect < 0.12


def test_crop_styles_and_downsample():
    size = (2048, 1024)
    center = place(size, _backend(resolution=512, crop=True, crop_style="center"), key="a")
    corner = place(size, _backend(resolution=512, crop=True, crop_style="corner"), key="a")
    r1 = place(size, _backend(resolution=512, crop=True, crop_style="random"), key="a")
    r2 = place(size, _backend(resolution=512, crop=True, crop_style="random"), key="a")
    assert center.box == (256, 0, 768, 512) and corner.box == (0, 0, 512, 512)
    assert r1 == r2  # fixed per file, so it can be part of the cache key
    big = place(size, _backend(resolution=512, maximum_image_size=1024, target_downsample_size=768), key="a")
    assert big.downsample is not None and abs((big.downsample[0] * big.downsample[1]) ** 0.5 - 768) < 2


def _groups():
    return [
        Group("subject", (64, 64), tuple(range(0, 5)) * 3, 1.0),  # 5 images, repeats 2
        Group("subject", (128, 64), tuple(range(5, 9)), 1.0),
        Group("reg", (64, 64), tuple(range(9, 29)), 0.5),
    ]


def _owner(i):
    return ("subject", (64, 64)) if i < 5 else ("subject", (128, 64)) if i < 9 else ("reg", (64, 64))


def test_every_batch_is_one_backend_and_one_bucket_and_repeats_count():
    s = BucketBatchSampler(_groups(), batch_size=2, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 8 + 2 + 10  # ceil(15 / 2) + 4 / 2 + 20 / 2
    for batch in batches:
        assert len({_owner(i) for _, i in batch}) == 1
    seen = Counter(i for b in batches for _, i in b)
    # 5 images x 3 passes = 15 draws, padded to 16 by wrapping around to the epoch's first batch
    assert all(3 <= seen[i] <= 4 for i in range(5)) and sum(seen[i] for i in range(5)) == 16
    assert all(seen[i] == 1 for i in range(5, 29))


@pytest.mark.parametrize("n,batch_size,world", [(5, 2, 1), (7, 3, 1), (11, 2, 2), (9, 4, 2)])
def test_leftovers_are_drawn_every_epoch_by_wrapping_around(n, batch_size, world):
    global_batch = batch_size * world
    groups = [Group("a", (64, 64), tuple(range(n)), 1.0), Group("tiny", (64, 128), (100,) * (global_batch - 1), 1.0)]
    ranks = [BucketBatchSampler(groups, batch_size, seed=4, rank=r, world_size=world) for r in range(world)]
    orders = []
    for epoch in range(3):
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        steps = len(per_rank[0])
        assert all(len(b) == steps == len(ranks[0]) for b in per_rank)  # equal steps on every rank
        assert steps == -(-n // global_batch)
        global_order = []
        for step in range(steps):
            one = [i for b in per_rank for e, i in b[step]]
            assert len(one) == global_batch and len(set(one)) == global_batch  # distinct within a step
            assert all(e == epoch for b in per_rank for e, _ in b[step])
            global_order += one
        seen = Counter(global_order)
        assert set(seen) == set(range(n)), "every image is drawn in every epoch"  # and never the too-small group
        assert sum(seen.values()) - n == steps * global_batch - n < global_batch
        assert max(seen.values()) <= 2
        orders.append(global_order)
    assert orders[0] != orders[1] != orders[2]


def test_distributed_ranks_get_distinct_samples_and_equal_steps():
    groups = [Group("a", (64, 64), tuple(range(36)), 1.0), Group("b", (64, 64), tuple(range(40, 52)), 1.0)]
    ranks = [list(BucketBatchSampler(groups, batch_size=3, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6 + 2
    flat = [[i for b in r for _, i in b] for r in ranks]
    assert not set(flat[0]) & set(flat[1])
    assert sorted(flat[0] + flat[1]) == list(range(36)) + list(range(40, 52))
    # step by step both ranks draw from the same backend
    for b0, b1 in zip(*ranks):
        assert (b0[0][1] < 40) == (b1[0][1] < 40)


def test_probability_weights_backends():
    groups = [Group("a", (64, 64), tuple(range(100)), 1.0), Group("b", (64, 64), tuple(range(100, 200)), 0.1)]
    first_half = list(BucketBatchSampler(groups, batch_size=1, seed=0))[:50]
    share_a = sum(b[0][1] < 100 for b in first_half) / 50
    assert share_a > 0.75
    none = BucketBatchSampler([groups[0], Group("z", (64, 64), (1, 2), 0.0)], batch_size=1)
    assert len(none) == 100


def test_epochs_reshuffle_and_resume_mid_epoch_continues_exactly():
    s = BucketBatchSampler(_groups(), batch_size=2, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(3)
    assert list(s) != full
    resumed = BucketBatchSampler(_groups(), batch_size=2, seed=3)
    resumed.load_state_dict({"epoch": 2, "position": 5})
    resumed.set_epoch(2)  # Lightning calls this with the restored epoch
    assert list(resumed) == full[5:]
    assert list(resumed) == full  # the next pass of the same epoch starts at 0 again
    # a checkpoint on the epoch's last batch resumes at the start of the next epoch
    s.set_epoch(3)
    after = list(s)
    at_end = BucketBatchSampler(_groups(), batch_size=2, seed=3)
    at_end.load_state_dict({"epoch": 2, "position": len(full)})
    assert list(at_end) == after


def test_lightning_sets_the_epoch_and_every_epoch_draws_every_image_in_a_new_order(
    tiny_model_cfg, cache_root, monkeypatch
):
    """Through Lightning: 16 demo images, batch 2, 3 epochs; each image once per epoch, new order each epoch."""
    from flux_lightning.data.datamodule import CachedLatentDataset

    from ..conftest import fit_tiny

    drawn, epochs = [], []
    original = CachedLatentDataset.__getitem__
    monkeypatch.setattr(
        CachedLatentDataset, "__getitem__", lambda self, key: (drawn.append(key), original(self, key))[1]
    )

    class Epochs(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            epochs.append(trainer.current_epoch)

    _, dm = fit_tiny(tiny_model_cfg, cache_root, steps=24, demo_images=16, callbacks=[Epochs()])
    assert len(dm.train_dataset) == 16 and len(drawn) == 48 and epochs == [e for e in range(3) for _ in range(8)]
    per_epoch = [[i for e, i in drawn if e == epoch] for epoch in range(3)]
    assert [e for e, _ in drawn] == [e for e in range(3) for _ in range(16)], "the sampler follows Lightning's epoch"
    for order in per_epoch:
        assert sorted(order) == list(range(16))
    assert per_epoch[0] != per_epoch[1] != per_epoch[2] != per_epoch[0]
