"""Files users hand on: a full disk as this safetensors reports it is one line (by errno, not by the
wording) with the cache consistent; exported files are 0644 and built folders 0755 under a 022 umask;
a file's link or copy (a checkpoint's LoRA in lora/step_<N>/) replaces its target whole."""

from __future__ import annotations

import os
import stat

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flux_lightning import atomic_files
from flux_lightning.atomic_files import (
    active_temporaries,
    build_folder_once,
    link_atomic,
    os_errno,
    save_safetensors_atomic,
)
from flux_lightning.data.cache import TensorCache
from flux_lightning.errors import StorageError

# how safetensors 0.8 words ENOSPC (seen on a full tmpfs): Rust's io::Error Display, no errno attribute
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _full_disk(*args, **kwargs):
    raise SafetensorError(FULL)


def test_the_errno_is_read_from_oserrors_and_rust_io_errors():
    assert os_errno(SafetensorError(FULL)) == 28
    assert os_errno(SafetensorError("IoError(Os { code: 30, kind: ReadOnlyFilesystem })")) == 30
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(122, "Disk quota exceeded")
    assert os_errno(wrapped) == 122
    assert os_errno(SafetensorError("tensor is not contiguous")) is None  # not a storage error
    assert os_errno(ValueError("No space left on device (os error 28)")) is None  # by type, not by any text


def test_a_full_disk_writing_a_file_or_a_cache_entry_is_one_line_and_keeps_the_cache(tmp_path, monkeypatch):
    target = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    save_safetensors_atomic({"a": torch.ones(2)}, target)
    cache = TensorCache(tmp_path / "cache")
    cache.save("k" * 64, {"latents": torch.zeros(16, 2, 2)}, {})
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    with pytest.raises(
        StorageError,
        match=r"cannot write pytorch_lora_weights.safetensors in .*lora \(No space left on device\); free space there",
    ):
        save_safetensors_atomic({"a": torch.zeros(2)}, target)
    with pytest.raises(StorageError, match="No space left on device"):
        cache.save("j" * 64, {"latents": torch.zeros(16, 2, 2)}, {})
    monkeypatch.undo()
    assert load_file(target)["a"].tolist() == [1.0, 1.0]  # the previous file is intact
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert "j" * 64 not in cache and "k" * 64 in cache


def test_a_full_disk_while_building_a_folder_is_one_line_and_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "config.json").write_text("{}")
        _full_disk()

    with pytest.raises(StorageError, match=r"cannot write tiny in .* \(No space left on device\)"):
        build_folder_once(tmp_path / "tiny", build)
    assert list(tmp_path.iterdir()) == []


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_exported_files_are_0644_and_built_folders_0755_under_umask_022(tmp_path):
    from flux_lightning.adapters.export import export_adapter  # noqa: F401  (the LoRA writer uses save_safetensors_atomic)

    previous = os.umask(0o022)
    try:
        path = save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
        folder = build_folder_once(
            tmp_path / "merged",
            lambda tmp: (
                (tmp / "transformer").mkdir(),
                safetensors.torch.save_file({"a": torch.zeros(2)}, tmp / "transformer" / "w.safetensors"),
            ),
        )
    finally:
        os.umask(previous)
    assert _mode(path) == 0o644
    assert _mode(folder) == 0o755 and _mode(folder / "transformer") == 0o755
    assert _mode(folder / "transformer" / "w.safetensors") == 0o644
    previous = os.umask(0o077)  # a private umask is kept
    try:
        private = save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "private.safetensors")
    finally:
        os.umask(previous)
    assert _mode(private) == 0o600


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_link_atomic_hard_links_replaces_the_target_and_leaves_no_temporary(tmp_path):
    source, target = tmp_path / "a.safetensors", tmp_path / "step" / "a.safetensors"
    source.write_bytes(b"new")
    target.parent.mkdir()
    target.write_bytes(b"old")
    assert link_atomic(source, target) == target
    assert os.path.samefile(source, target) and target.read_bytes() == b"new"
    link_atomic(source, target)  # already this file (a second save at one step): nothing to do
    assert os.path.samefile(source, target)
    assert _leftovers(target.parent) == [] and active_temporaries() == []


def test_link_atomic_copies_where_links_fail_and_a_failed_copy_keeps_the_target(tmp_path, monkeypatch):
    source, target = tmp_path / "a.safetensors", tmp_path / "step" / "a.safetensors"
    source.write_bytes(b"new")

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(atomic_files.os, "link", no_link)
    link_atomic(source, target)
    assert target.read_bytes() == b"new" and not os.path.samefile(source, target)

    def full_disk(src, dst):
        with open(dst, "wb") as f:
            f.write(b"ha")  # half a copy, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_files.shutil, "copyfile", full_disk)
    source.write_bytes(b"newer")
    with pytest.raises(StorageError, match=r"cannot write a.safetensors in .*step \(No space left on device\)"):
        link_atomic(source, target)
    assert target.read_bytes() == b"new"  # the previous file is intact
    assert _leftovers(target.parent) == [] and active_temporaries() == []
