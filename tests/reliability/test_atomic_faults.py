"""Atomic writes under faults: a full disk (simulated and real tmpfs) and the temp files crashes leave behind."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import atomic
from dreambooth.errors import TrainingError


class FakeSafetensorError(Exception):
    """How safetensors' Rust writer reports ENOSPC: not an OSError, errno only in the text."""


@pytest.mark.parametrize("error, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (FakeSafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("shape mismatch"), False),
])
def test_is_disk_full_reads_errno_and_library_wording(error: Exception, full: bool) -> None:
    assert atomic.is_disk_full(error) is full


def test_is_disk_full_follows_the_cause_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert atomic.is_disk_full(outer)


def test_library_disk_full_becomes_enospc_naming_the_target(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous weights")
    with pytest.raises(OSError) as caught, atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new weights")
        raise FakeSafetensorError("I/O error: No space left on device (os error 28)")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_bytes() == b"previous weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_disk_full_guard_gives_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(TrainingError) as caught, atomic.disk_full_guard(tmp_path):
        raise atomic.disk_full(tmp_path / "x.safetensors")
    message = str(caught.value)
    assert "Disk full" in message and "free space" in message and str(tmp_path / "x.safetensors") in message
    assert "\n" not in message
    with pytest.raises(KeyError), atomic.disk_full_guard(tmp_path):
        raise KeyError("not a disk problem")


def test_remove_stale_temps_removes_only_temporaries(tmp_path: Path) -> None:
    real = [tmp_path / "tiny_3.safetensors", tmp_path / "db_config.json", tmp_path / ".hidden_user_file"]
    temps = [tmp_path / ".tiny_3.safetensors.ab12cd.tmp", tmp_path / ".db_config.json.x9.tmp",
             tmp_path / ".working.tmp-1234abcd", tmp_path / "snapshots" / ".tmp-step-00000002-ab"]
    for path in real + temps[:2]:
        path.write_text("x")
    for folder in temps[2:]:
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "w.safetensors").write_text("half")
    other = tmp_path / ".other_1.safetensors.zz.tmp"
    other.write_text("another model's export in progress")
    assert set(atomic.remove_stale_temps(tmp_path, prefix="tiny_")) == {temps[0]}
    removed = atomic.remove_stale_temps(tmp_path, recursive=True)
    assert set(removed) == set(temps[1:]) | {other}
    assert all(p.exists() for p in real) and not any(p.exists() for p in temps)


def test_real_full_disk_keeps_previous_file_and_leaves_no_temp(small_tmpfs: Callable[[int], Path]) -> None:
    folder = small_tmpfs(256 * 1024)
    target = folder / "weights.safetensors"
    atomic.save_safetensors({"w": torch.ones(1000)}, target)
    with pytest.raises(OSError) as caught:
        atomic.save_safetensors({"w": torch.zeros(200_000)}, target)  # 800 kB into 256 kB
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert torch.equal(load_file(str(target))["w"], torch.ones(1000))
    assert [p.name for p in folder.iterdir()] == ["weights.safetensors"]


def test_real_full_disk_with_torch_save(small_tmpfs: Callable[[int], Path]) -> None:
    """torch.save reports a full disk only as 'unexpected pos': the free-space check still names it."""
    folder = small_tmpfs(256 * 1024)
    target = folder / "state.pt"
    with pytest.raises(OSError) as caught, atomic.atomic_path(target) as tmp:
        torch.save({"w": torch.zeros(200_000)}, tmp)
    assert caught.value.errno == errno.ENOSPC
    assert list(folder.iterdir()) == []
