"""Aspect buckets and the bucketed, weighted, distributed, resumable batch sampler."""

from collections import Counter

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
        ((2000, 1000), dict(resolution=512, crop=True, crop_aspect="closest", crop_aspect_buckets=[1.0, 1.5, 0.75]), (640, 448)),
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
    assert len(batches) == len(s) == 7 + 2 + 10
    for batch in batches:
        assert len({_owner(i) for _, i in batch}) == 1
    seen = Counter(i for b in batches for _, i in b)
    assert all(seen[i] <= 3 for i in range(5)) and sum(seen[i] for i in range(5)) == 14


def test_distributed_ranks_get_distinct_samples_and_equal_steps():
    groups = [Group("a", (64, 64), tuple(range(40)), 1.0), Group("b", (64, 64), tuple(range(40, 55)), 1.0)]
    ranks = [list(BucketBatchSampler(groups, batch_size=3, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6 + 2
    flat = [[i for b in r for _, i in b] for r in ranks]
    assert not set(flat[0]) & set(flat[1])
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
