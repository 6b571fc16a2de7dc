"""Files and folders written atomically: a kill during a save leaves the previous file intact.

A file is written to a temporary name in its own folder and renamed onto its path (``os.replace``):
Lightning checkpoints (:class:`AtomicCheckpointIO`), safetensors files (:func:`save_safetensors_atomic`),
text (:func:`write_text_atomic`), a file's hard link or copy (:func:`link_atomic`) and whole folders
built once (:func:`build_folder_once`, e.g. the tiny model or the demo data). A full, read-only or
unwritable folder raises a one-line :class:`~flux_lightning.errors.StorageError`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import StorageError

# How Rust's std::io::Error shows an OS error (safetensors wraps it in a SafetensorError, which has no
# errno): its Display "... (os error 28)" (safetensors 0.5+) and its Debug "Os { code: 28, ... }" (older).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def os_errno(err: BaseException | None) -> int | None:
    """The errno behind ``err``: an OSError's in its chain (``__cause__``/``__context__``), or the OS
    error code a Rust writer's error (safetensors' ``SafetensorError``) carries; None when none does."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno:
            return err.errno
        if type(err).__name__ == "SafetensorError":
            found = _RUST_OS_ERROR.search(str(err))
            if found:
                return int(found.group(1) or found.group(2))
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _unwritable(path: Path, err: BaseException) -> StorageError:
    """One-line :class:`StorageError` for ``path`` from the OS error at the root of ``err``'s chain."""
    errno_ = os_errno(err)
    reason = os.strerror(errno_) if errno_ else f"{type(err).__name__}: {err}"
    fix = {
        errno.ENOSPC: "free space there",
        errno.EDQUOT: "free space there (disk quota exceeded)",
        errno.EROFS: "it is on a read-only file system: point paths.output_dir (or run_name) elsewhere",
    }.get(errno_, "make it writable or point paths.output_dir (or run_name) elsewhere")
    return StorageError(
        errno_ or errno.EIO,
        f"cannot write {path.name} in {path.parent} ({reason}); {fix}, then re-run the same command "
        "(the previous file there is intact)",
    )


def _umask() -> int:
    """The process's umask, read now (Linux: /proc, without changing it; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _signals_held():
    """SIGINT/SIGTERM wait (blocked in this thread, delivered on exit) while a temporary file is
    created or removed: the run's stop handler raises at once before training, and an exception that
    lands between ``mkstemp`` and the cleanup would leave the half-written file behind."""
    held = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if held else None
    try:
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


_ACTIVE: set[str] = set()  # temporary files being written now (stopping's watchdog removes them on a hard stop)


def active_temporaries() -> list[str]:
    """The temporary files this process is writing at this moment."""
    return list(_ACTIVE)


@contextmanager
def _temporary_beside(path: Path, prefix: str):
    """A temporary file in ``path``'s folder, renamed onto ``path`` when the block succeeds and removed
    otherwise (also when a stop signal's exception interrupts it); any OSError (or a writer's error
    caused by one) becomes a one-line :class:`StorageError`."""
    tmp = None
    try:
        with _signals_held():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            _ACTIVE.add(tmp)
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give (0644 usually)
        yield fd, tmp
        os.replace(tmp, path)
    except Exception as err:
        if isinstance(err, OSError) or _caused_by_oserror(err):
            raise _unwritable(path, err) from None
        raise
    finally:
        if tmp is not None:
            with _signals_held(), suppress(OSError):
                _ACTIVE.discard(tmp)
                os.remove(tmp)


def _caused_by_oserror(err: BaseException | None) -> bool:
    """An OSError in the chain, or a Rust writer's error that wraps one (see :func:`os_errno`)."""
    return isinstance(err, OSError) or os_errno(err) is not None


def _user_mode(path, folder: bool = False) -> None:
    """What ``open()``/``mkdir()`` would give under the umask (0644 / 0755 usually): writers that
    create 0600 files (safetensors' ``save_file``, ``mkstemp``) or 0700 folders (``mkdtemp``) would
    keep a LoRA from another account's ComfyUI."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    Raises:
        StorageError: the folder is full, read-only or not writable (one line naming it).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        with _temporary_beside(path, f".{path.name}.") as (fd, tmp):
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to a temporary name in the same folder, then ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    with _temporary_beside(path, f".{path.name[:16]}.") as (fd, tmp):
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)  # safetensors may replace tmp by a new 0600 file
        _user_mode(tmp)
    return path


def write_text_atomic(path, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    with _temporary_beside(path, f".{path.name[:16]}.") as (fd, tmp):
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def link_atomic(source, target) -> Path:
    """``target`` = ``source``'s content: a hard link (a copy where links fail, e.g. across file systems)
    made under a temporary name beside ``target`` and renamed onto it. Nothing is done when ``target``
    already is ``source`` (renaming one link of a file onto another is a no-op that would leave the
    temporary name behind)."""
    source, target = Path(source), Path(target)
    if target.exists() and os.path.samefile(source, target):
        return target
    with _temporary_beside(target, f".{target.name[:16]}.") as (fd, tmp):
        os.close(fd)
        os.remove(tmp)  # os.link needs the name free (mkstemp chose a unique one); removed again on a failure
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return target


def build_folder_once(folder, build: Callable[[Path], None], marker: str | None = None) -> Path:
    """Create ``folder`` once: ``build(tmp)`` fills a sibling temporary folder that is then renamed
    into place, so a half-built folder is never seen. ``marker``: a file whose presence means the
    folder is complete (default: the folder existing)."""
    folder = Path(folder)

    def ready() -> bool:
        return (folder / marker).is_file() if marker else folder.is_dir()

    if ready():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as err:
        raise _unwritable(folder, err) from None
    try:
        _user_mode(tmp, folder=True)  # mkdtemp's 0700 -> 0755 under a 022 umask
        try:
            build(tmp)
        except Exception as err:  # a full disk while building (save_pretrained's SafetensorError included)
            if _caused_by_oserror(err):
                raise _unwritable(folder, err) from None
            raise
        for sub, dirs, files in os.walk(tmp):  # writers' 0600 files (save_file) -> 0644
            for name in dirs:
                _user_mode(Path(sub) / name, folder=True)
            for name in files:
                if os.lstat(Path(sub) / name).st_nlink == 1:  # a hard link shares its source's mode: untouched
                    _user_mode(Path(sub) / name)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first; its folder is identical
            if not ready():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
