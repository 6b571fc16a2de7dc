"""Caching with several processes: every rank encodes a share of the missing entries, each entry
once, and the cache is the one a single process writes, tensor bytes and headers equal (the same chunks go through
the same VAE / text-encoder calls, however they are shared out)."""

import json
import os
import struct
import subprocess
import sys

import pytest

from ..conftest import REPO


def _run(cache, devices, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "support" / "rank_caching_script.py"),
            str(cache),
            str(devices),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)], proc.stderr


def _entry(path):
    """(header as a dict, tensor bytes): safetensors writes its metadata map in a per-process
    order, so the header is compared parsed; the tensors byte for byte."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _entries(cache):
    return {p.relative_to(cache).as_posix(): _entry(p) for p in cache.rglob("*.safetensors") if "demo" not in p.parts}


@pytest.mark.slow
def test_two_ranks_share_the_encoding_and_write_the_single_process_cache(tmp_path):
    (one,), _ = _run(tmp_path / "one" / "cache", 1, tmp_path / "out1")
    ranks, err = _run(tmp_path / "two" / "cache", 2, tmp_path / "out2")
    single, double = _entries(tmp_path / "one" / "cache"), _entries(tmp_path / "two" / "cache")
    assert single.keys() == double.keys() and len(single) > 8
    assert [k for k in single if single[k] != double[k]] == []
    # each entry encoded once, by one rank, and both ranks did part of the work
    written = ranks[0]["encoded"] + ranks[1]["encoded"]
    assert len(written) == len(set(written)) == len(one["encoded"]) == len(single)
    assert all(r["encoded"] for r in ranks), [len(r["encoded"]) for r in ranks]
    # discovery ran once (rank 0) and rank 1 got the same samples from it
    assert ranks[0]["samples"] == ranks[1]["samples"] == one["samples"]
    assert err.count("reading images of 'demo'") <= 2  # one bar (a redraw or two), not one per rank
    assert not (tmp_path / "two" / "cache" / ".sync").exists() or not any(
        (tmp_path / "two" / "cache" / ".sync").iterdir()
    )
