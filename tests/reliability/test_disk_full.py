"""A full disk during training: one clear error naming the folder, earlier files intact, the service usable.

Simulated with a failing writer (safetensors' writer writes half the file, then fails with the words the
real one uses for ENOSPC) at each kind of save, and for real with a small tmpfs as the checkpoints folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faultkit
import pytest
import safetensors.torch

from dreambooth.service import FAILED, FINISHED, TrainingService, TrainStatus

from fake_host import FakeHost

SETTINGS = {"with_prior_preservation": False, "cache_latents": "memory", "max_train_steps": 4,
            "save_every_n_steps": 2, "snapshot_every_n_steps": 2}
ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"


class DiskFullWriter:
    """Replaces safetensors' save_file: the first write under `folder` (after `skip` such writes) fails."""

    def __init__(self, folder: Path, skip: int, workspace: Path):
        self.folder = folder.resolve()
        self.skip = skip
        self.workspace = workspace
        self.failed: Path | None = None
        self.before: dict[Path, bytes] = {}  # the workspace's files just before the failing write
        self.real = safetensors.torch.save_file

    def __call__(self, tensors: Any, filename: Any, metadata: Any = None) -> None:
        path = Path(filename).resolve()
        if self.failed is None and path.is_relative_to(self.folder):
            if self.skip == 0:
                self.before = saved_files(self.workspace)
                self.real(tensors, filename, metadata=metadata)
                with open(path, "r+b") as handle:  # the disk filled half-way through the file
                    handle.truncate(path.stat().st_size // 2)
                self.failed = path
                raise safetensors.SafetensorError(ENOSPC_TEXT)
            self.skip -= 1
        self.real(tensors, filename, metadata=metadata)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path, int, Path], DiskFullWriter]]:
    def install(folder: Path, skip: int, workspace: Path) -> DiskFullWriter:
        import transformers.modeling_utils as modeling

        writer = DiskFullWriter(folder, skip, workspace)
        monkeypatch.setattr(safetensors.torch, "save_file", writer)
        if hasattr(modeling, "safe_save_file"):
            monkeypatch.setattr(modeling, "safe_save_file", writer)
        return writer

    yield install


def train_with_service(root: Path) -> tuple[TrainingService, TrainStatus]:
    service = TrainingService(FakeHost(faultkit.layout_of(root)))
    service.start(faultkit.MODEL)
    return service, service.wait(timeout=600)


def assert_disk_full_reported(status: TrainStatus, folder: Path) -> None:
    assert status.state == FAILED
    message = status.error or ""
    assert re.search(r"disk (is )?full", message, re.I) and "free space" in message, message
    assert str(folder.resolve()) in message or str(folder) in message, message
    assert "\n" not in message


def leftover_temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if faultkit.is_temporary(p, root)]


def saved_files(root: Path) -> dict[Path, bytes]:
    """Everything written so far, by path: the files a failed save must not touch."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
            and not faultkit.is_temporary(p, root)}


# Where the disk fills: the folder written to and how many earlier safetensors writes there succeed.
# A run of 4 steps writes: export tiny_2, snapshot 2, snapshot 4, working/ (unet first), export tiny_4.
TARGETS = {
    "export": (lambda model, layout: layout.checkpoints_dir, 1),  # the final export (tiny_2 made it)
    "snapshot": (lambda model, layout: model.snapshots, 0),  # the first snapshot (step 2)
    "working": (lambda model, layout: model.root, 2),  # the final working/ save (after snapshots 2 and 4)
}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_failing_writer_stops_cleanly_and_keeps_earlier_files(
        target: str, workspace: Callable[..., Path], full_disk: Callable[..., DiskFullWriter],
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = workspace("dreambooth", **SETTINGS)
    folder_of, skip = TARGETS[target]
    folder = folder_of(faultkit.model_of(root), faultkit.layout_of(root))
    writer = full_disk(folder, skip, root)
    service, status = train_with_service(root)
    assert writer.failed is not None, "the simulated full disk was never hit"
    assert_disk_full_reported(status, folder)
    assert not service.is_busy() and service.host.released is False  # stopped cleanly, web UI model back
    assert faultkit.workspace_problems(root, {}) == []
    for path, content in writer.before.items():
        assert path.read_bytes() == content, f"{path} changed by the failed save"
    assert leftover_temps(root) == []
    monkeypatch.undo()  # space freed
    service.start(faultkit.MODEL)
    final = service.wait(timeout=600)
    assert final.state == FINISHED, final.error
    assert_run_finished(root)


def assert_run_finished(root: Path) -> None:
    """The restarted run completed: its final snapshot is marked finished and its final export loads."""
    from dreambooth.train import snapshots

    found = snapshots.list_snapshots(faultkit.model_of(root).snapshots)
    assert found and snapshots.read_meta(found[-1]).get("finished") and found[-1].name.endswith(
        f"{SETTINGS['max_train_steps']:08d}")
    final_export = faultkit.layout_of(root).checkpoints_dir / f"tiny_{SETTINGS['max_train_steps']}.safetensors"
    assert faultkit.file_problem(final_export) is None and final_export.is_file()


def test_real_full_disk_in_the_checkpoints_folder(workspace: Callable[..., Path], small_tmpfs: Callable[..., Path],
                                                  base_working: Path) -> None:
    root = workspace("dreambooth", **SETTINGS)
    layout = faultkit.layout_of(root)
    export_size = sum(p.stat().st_size for p in base_working.rglob("*.safetensors"))
    small_tmpfs(int(export_size * 2.5), at=layout.checkpoints_dir)  # room for the run's two exports
    previous = layout.checkpoints_dir / "previous.safetensors"
    safetensors.torch.save_file({"w": __import__("torch").ones(16)}, str(previous))
    filler = layout.checkpoints_dir / "filler.bin"
    filler.write_bytes(b"\0" * int(export_size * 1.7))  # leaves less than one export free
    service, status = train_with_service(root)
    assert_disk_full_reported(status, layout.checkpoints_dir)
    assert sorted(p.name for p in layout.checkpoints_dir.iterdir()) == ["filler.bin", "previous.safetensors"]
    assert faultkit.file_problem(previous) is None
    assert not service.is_busy()
    filler.unlink()  # the user frees space
    service.start(faultkit.MODEL)
    final = service.wait(timeout=600)
    assert final.state == FINISHED, final.error
    assert_run_finished(root)
