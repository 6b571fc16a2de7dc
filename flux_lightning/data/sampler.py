"""Bucketed, backend-weighted, distributed-aware and resumable batch sampling."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    """Samples that may share a batch: one backend, one bucket.

    ``indices`` already include the backend's ``repeats`` (each index appears ``repeats + 1`` times).
    """

    backend: str
    bucket: tuple[int, int]
    indices: tuple[int, ...]
    probability: float = 1.0


class BucketBatchSampler:
    """Yields per-rank batches of ``(epoch, index)`` keys; every batch is one backend and one bucket.

    Each epoch (seeded by ``seed`` and the epoch) every group is shuffled and cut into *global*
    batches of ``batch_size * world_size``; global batches are ordered by a weighted random shuffle
    in which a backend's weight is its ``probability`` (so larger backends, having more batches,
    and likelier ones come up more often); rank ``r`` takes slice ``r`` of each global batch. All
    ranks therefore take the same number of steps on distinct samples. Leftovers smaller than a
    global batch wait for the next epoch's shuffle.

    The position inside an epoch is resumable: ``load_state_dict({"epoch": e, "position": k})``
    makes the next iteration of epoch ``e`` start at its ``k``-th batch.
    """

    def __init__(
        self,
        groups: Sequence[Group],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.groups = [g for g in groups if g.probability > 0]
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self._start = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g.indices) // self.global_batch for g in self.groups)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch``, in order (indices into the dataset)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        keyed = []
        for g in self.groups:
            idx = list(g.indices)
            rng.shuffle(idx)
            for b in range(len(idx) // self.global_batch):
                chunk = idx[b * self.global_batch : (b + 1) * self.global_batch]
                # Efraimidis-Spirakis: key u^(1/w), larger first = weighted random order
                keyed.append((rng.random() ** (1.0 / g.probability), chunk))
        keyed.sort(key=lambda kc: kc[0], reverse=True)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [chunk[lo:hi] for _, chunk in keyed]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self._start
        self._start = 0
        for batch in self.epoch_batches(epoch)[start:]:
            yield [(epoch, i) for i in batch]

    def state_dict(self, position: int) -> dict:
        return {"epoch": self.epoch, "position": position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._start = int(state["epoch"]), int(state["position"])
