"""Bucketed, backend-weighted, distributed-aware and resumable batch sampling."""

from __future__ import annotations

import math
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


def global_batches(n: int, global_batch: int) -> int:
    """Global batches a group of ``n`` samples fills per epoch: ``ceil(n / G)``, or 0 when ``n < G``."""
    return math.ceil(n / global_batch) if n >= global_batch else 0


class BucketBatchSampler:
    """Yields per-rank batches of ``(epoch, index)`` keys; every batch is one backend and one bucket.

    Each epoch (seeded by ``seed`` and the epoch) every group of ``n`` samples is shuffled and cut
    into ``ceil(n / G)`` *global* batches of ``G = batch_size * world_size``. The last one, when
    ``n`` is not a multiple of ``G``, is filled up by wrapping around to the start of that epoch's
    shuffled order (as torch's ``DistributedSampler`` pads), so every sample (times its repeats)
    is drawn in every epoch and ``G - n mod G`` entries twice (never twice in one global batch:
    the padding comes from the first batch, ``n >= G``). A group smaller than one global batch (``n < G``) is not drawn (the datamodule
    warns). Global batches are ordered by a weighted random shuffle in which a backend's weight is
    its ``probability`` (so larger backends, having more batches, and likelier ones come up more
    often); rank ``r`` takes slice ``r`` of each global batch, so all ranks take the same number of
    steps on distinct samples.

    Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` at every epoch start
    (never on the batch sampler itself), so :attr:`sampler` is this object.

    The position inside an epoch is resumable: ``load_state_dict({"epoch": e, "position": k})``
    makes the next iteration of epoch ``e`` start at its ``k``-th batch; a position at the end of
    an epoch means the start of epoch ``e + 1`` (what Lightning resumes into).
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

    @property
    def sampler(self) -> BucketBatchSampler:
        """This sampler: where Lightning's ``_set_sampler_epoch`` looks for ``set_epoch``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(global_batches(len(g.indices), self.global_batch) for g in self.groups)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch``, in order (indices into the dataset)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        gb = self.global_batch
        keyed = []
        for g in self.groups:
            idx = list(g.indices)
            rng.shuffle(idx)
            count = global_batches(len(idx), gb)
            padded = idx + idx[: count * gb - len(idx)]  # wrap around: < G extra, all distinct
            for b in range(count):
                # Efraimidis-Spirakis: key u^(1/w), larger first = weighted random order
                keyed.append((rng.random() ** (1.0 / g.probability), padded[b * gb : (b + 1) * gb]))
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
        if self._start >= len(self) > 0:  # saved on an epoch's last batch: the next epoch starts fresh
            self.epoch, self._start = self.epoch + 1, 0
