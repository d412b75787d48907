"""Atomic writes: a writer that fails midway leaves the previous file and no temporary files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth import atomic


def test_write_json_creates_folders_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.json"
    atomic.write_json(target, {"v": 1})
    atomic.write_json(target, {"v": "ü"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"v": "ü"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_writer_raising_midway_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="crash"), atomic.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(tmp_path / "new.json"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failing_rename_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "c.json"
    atomic.write_json(target, {"v": 1})

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        atomic.write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_unserialisable_json_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "c.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic.write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_save_safetensors_failure_keeps_old_file(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    target = tmp_path / "m.safetensors"
    atomic.save_safetensors({"w": torch.ones(2)}, target, metadata={"k": "v"})
    with pytest.raises(Exception):  # noqa: B017 - any refusal from safetensors will do
        atomic.save_safetensors({"w": "not a tensor"}, target)  # type: ignore[dict-item]
    assert load_file(str(target))["w"].equal(torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_write_text_is_utf8(tmp_path: Path) -> None:
    atomic.write_text(tmp_path / "t.txt", "caption ✓")
    assert (tmp_path / "t.txt").read_bytes() == "caption ✓".encode()


def test_written_files_get_the_usual_mode(tmp_path):
    """Temporary files start as 0600; the final file must be readable like any other new file (umask)."""
    import os

    import torch

    from dreambooth import atomic

    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    atomic.write_text(tmp_path / "a.txt", "x")
    atomic.save_safetensors({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    for name in ("a.txt", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected
