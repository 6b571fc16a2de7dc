"""RNG streams: a checkpoint's snapshot restores every stream; evaluation and tiny-model builds move none."""

import random

import numpy as np
import torch

from flux_lightning.training.rng import preserved_rng, rng_states, seeded, set_rng_states


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_a_snapshot_restored_replays_every_stream_and_survives_a_weights_only_load(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_preserved_rng_and_seeded_leave_the_streams_where_they_were():
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    snapshot = rng_states()
    expected = _draws()
    set_rng_states(snapshot)
    with preserved_rng():
        _draws()
    with seeded(7):
        inside = torch.rand(3)
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert _draws() == expected
