"""Caching with several processes: who discovers, who encodes what, and waiting without a timeout.

The ranks that share a cache (those of one machine while ``prepare_data_per_node`` is true, the
Lightning default; every rank otherwise) form a :class:`CacheGroup`. Its leader discovers the images
and checks the existing entries once, then publishes the plan (samples and missing entries) as a
file; every member encodes its share of the missing entries and marks itself done; all wait until
every member is done. The waits poll files in ``<cache root>/.sync/<token>/`` (the token comes from
one broadcast at the start), so they never hit a process-group timeout however long an encode
takes, and a SIGTERM/SIGINT stops a waiting rank within a poll (:func:`flux_lightning.training.stopping.check`).
A member that fails writes its error there, and the others stop with it instead of waiting forever.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import USER_ERRORS, DataError
from ..training import stopping

POLL_S = 0.2
STALE_S = 24 * 3600  # sync folders older than this are left-overs of killed runs


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary name, so a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class CacheGroup:
    """``index`` of ``size`` ranks sharing one cache; ``folder``: this caching round's sync folder;
    ``node``: a prefix that keeps each machine's files apart when the group is per machine."""

    index: int = 0
    size: int = 1
    folder: Path | None = None
    node: str = "all"

    @property
    def leader(self) -> bool:
        return self.index == 0

    @classmethod
    def of(cls, trainer, per_node: bool, root: Path) -> CacheGroup:
        """The group of ``trainer``'s rank (one rank, no folder, without a multi-process trainer)."""
        if trainer is None or trainer.world_size <= 1:
            return cls()
        token = trainer.strategy.broadcast(uuid.uuid4().hex if trainer.is_global_zero else None)
        folder = Path(root) / ".sync" / token
        if per_node:
            return cls(
                trainer.local_rank, trainer.world_size // max(1, trainer.num_nodes), folder, f"node{trainer.node_rank}"
            )
        return cls(trainer.global_rank, trainer.world_size, folder, "all")

    def _file(self, name: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.node}-{name}"

    def publish(self, plan) -> None:
        """Leader: write the plan (atomic) for the other members; removes stale sync folders."""
        if self.folder is None:
            return
        for old in self.folder.parent.glob("*"):
            try:
                if old != self.folder and time.time() - old.stat().st_mtime > STALE_S:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        self.folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self._file("plan.pkl"), pickle.dumps(plan))

    def receive(self):
        """Member: the leader's plan, once it is written."""
        path = self._file("plan.pkl")
        self._wait(lambda: path.is_file(), "the leader's image discovery")
        return pickle.loads(path.read_bytes())

    def fail(self, err: BaseException) -> None:
        """Tell the other members that this one stopped (they raise instead of waiting)."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        kind = "user" if isinstance(err, USER_ERRORS) else type(err).__name__
        write_bytes_atomic(self._file(f"rank{self.index}.failed"), f"{kind}\n{err}".encode())

    def done(self) -> None:
        """Mark this member done, then wait until every member is."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self._file(f"rank{self.index}.done"), b"")
        files = [self._file(f"rank{i}.done") for i in range(self.size)]
        self._wait(lambda: all(f.is_file() for f in files), "the other ranks' caching")

    def _wait(self, ready, what: str) -> None:
        while not ready():
            stopping.check()
            for failed in self.folder.glob(f"{self.node}-rank*.failed"):
                kind, _, message = failed.read_text().partition("\n")
                if kind == "user":
                    raise DataError(message)
                raise RuntimeError(
                    f"caching stopped: {failed.name.split('-')[-1].removesuffix('.failed')} failed ({kind}: {message})"
                )
            time.sleep(POLL_S)

    def cleanup(self) -> None:
        """Leader, after every member passed :meth:`done` (a collective barrier): remove the folder."""
        if self.folder is not None and self.leader:
            shutil.rmtree(self.folder, ignore_errors=True)


def share(items: list, group: CacheGroup) -> list:
    """This member's items: every ``size``-th from ``index`` (chunks keep their global composition,
    so an entry is computed the same way whatever the number of ranks)."""
    return items[group.index :: group.size]


def caching_workers(configured: int | None, local_ranks: int) -> int:
    """DataLoader workers that decode and resize images while the VAE encodes: ``dataset.num_workers``
    when set, else up to 4 per rank, leaving one core per rank for the encoder."""
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, local_ranks) - 1))
