"""Nothing this project reads back runs code: a pickle payload planted in every file it reads (snapshot files,
latent cache, config, class images, a .ckpt) never executes, and the user is told what was refused."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faultkit
import pytest
import torch

from dreambooth.errors import DreamboothError, ModelError
from dreambooth.models.loading import load_checkpoint
from dreambooth.train import snapshots
from dreambooth.train.trainer import Trainer

from fake_host import FakeHost


class Payload:
    """Unpickling this creates the marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def plant(path: Path, marker: Path) -> None:
    """Replace `path` with a pickle that runs code when loaded (the way torch.save or pickle would write it)."""
    path.unlink(missing_ok=True)
    if path.suffix in (".pt", ".ckpt"):
        torch.save({"state_dict": {"w": torch.ones(1)}, "payload": Payload(marker)}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"payload": Payload(marker)}, handle)


def train(root: Path, **settings: Any) -> Any:
    config = faultkit.model_of(root).load_config()
    for name, value in settings.items():
        setattr(config, name, value)
    return Trainer(config, FakeHost(faultkit.layout_of(root))).run()


RUN = {"max_train_steps": 4, "snapshot_every_n_steps": 2, "save_every_n_steps": 0}


@pytest.fixture
def stopped_run(workspace: Callable[..., Path]) -> Path:
    """A workspace whose run was interrupted after its step-2 snapshot (disk cache and class images on disk)."""
    from dreambooth.train.events import Progress, TrainCallbacks, TrainCommands

    root = workspace("dreambooth")
    commands = TrainCommands()

    class StopAt3(TrainCallbacks):
        def on_progress(self, progress: Progress) -> None:
            if progress.step == 3:
                commands.stop(save=False)

    config = faultkit.model_of(root).load_config()
    for name, value in RUN.items():
        setattr(config, name, value)
    assert Trainer(config, FakeHost(faultkit.layout_of(root)), StopAt3(), commands).run().stopped
    return root


SNAPSHOT_FILES = [snapshots.TENSORS_FILE, snapshots.OBJECTS_TENSORS_FILE, snapshots.OBJECTS_STRUCTURE_FILE,
                  snapshots.STATE_FILE, snapshots.LEGACY_OBJECTS_FILE]


@pytest.mark.parametrize("name", SNAPSHOT_FILES)
def test_a_payload_in_any_snapshot_file_never_runs(stopped_run: Path, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "marker"
    [snapshot] = snapshots.list_snapshots(faultkit.model_of(stopped_run).snapshots)
    plant(snapshot / name, marker)
    with pytest.raises(DreamboothError) as caught:
        train(stopped_run, **RUN)
    assert not marker.exists()
    message = str(caught.value)
    assert str(snapshot) in message or snapshot.name in message, message
    assert "\n" not in message and "weights_only" not in message


def test_a_payload_in_the_latent_cache_class_images_or_config_never_runs(stopped_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    model = faultkit.model_of(stopped_run)
    cached = sorted(model.cache.rglob("*.safetensors"))
    class_images = sorted(model.class_images.rglob("*.png"))
    assert cached and class_images
    for path in (*cached, *class_images):
        plant(path, marker)
    result = train(stopped_run, **RUN)  # unreadable cache entries are encoded again, bad class images skipped
    assert result.completed and not marker.exists()
    plant(model.config_path, marker)
    with pytest.raises(DreamboothError, match=str(model.config_path.name)) as caught:
        model.load_config()
    assert "\n" not in str(caught.value) and not marker.exists()


def test_a_ckpt_with_code_is_refused_in_one_line_without_torchs_advice(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant(tmp_path / "model.ckpt", marker)
    with pytest.raises(ModelError) as caught:
        load_checkpoint(tmp_path / "model.ckpt")
    message = str(caught.value)
    assert not marker.exists()
    assert message == (f"Checkpoint {tmp_path / 'model.ckpt'} contains code or objects that are not tensors and is "
                       "not loaded (code in a model file is never run); use a .safetensors version of it.")
    assert "weights_only" not in message and "\n" not in message


def test_no_source_file_unpickles() -> None:
    """The guard behind the tests above: no reader in the package can unpickle at all."""
    package = Path(snapshots.__file__).resolve().parents[1]
    offenders = []
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for needle in ("weights_only=False", "pickle.load", "allow_pickle=True", "yaml.load(", "yaml.unsafe_load"):
            if needle in text:
                offenders.append(f"{path.relative_to(package)}: {needle}")
    assert not offenders, offenders
