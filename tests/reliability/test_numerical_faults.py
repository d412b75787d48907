"""NaN/inf loss and CUDA out-of-memory, injected into the UNet's forward pass of a real training run."""

from __future__ import annotations

import gc
import logging
import math
import re
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faultkit
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from dreambooth.errors import TrainingError
from dreambooth.service import FAILED, FINISHED, TrainingService
from dreambooth.train import snapshots
from dreambooth.train.events import TrainCallbacks
from dreambooth.train.trainer import Trainer

from fake_host import FakeHost

SETTINGS = {"with_prior_preservation": False, "cache_latents": "memory", "max_train_steps": 4,
            "save_every_n_steps": 1, "snapshot_every_n_steps": 1, "save_on_end": True}


class Recorder(TrainCallbacks):
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def on_warning(self, text: str) -> None:
        self.warnings.append(text)

    def on_error(self, text: str) -> None:
        self.errors.append(text)


class FaultyForward:
    """Wraps UNet2DConditionModel.forward: on the listed calls (1-based) the output turns NaN/inf or it raises."""

    def __init__(self, calls: set[int], fault: str):
        self.calls, self.fault, self.count = calls, fault, 0
        self.real = UNet2DConditionModel.forward
        self.unets: list[weakref.ref[Any]] = []

    def __call__(self, unet: Any, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        self.unets.append(weakref.ref(unet))
        if self.count in self.calls and self.fault == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8.00 GiB "
                                              "total capacity; 7.10 GiB already allocated)")
        if self.count in self.calls and self.fault == "oom-runtime":
            raise RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB")
        output = self.real(unet, *args, **kwargs)
        if self.count in self.calls:
            output.sample = output.sample * float("nan" if self.fault == "nan" else "inf")
        return output


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Callable[[set[int], str], FaultyForward]:
    def install(calls: set[int], fault: str) -> FaultyForward:
        forward = FaultyForward(calls, fault)
        monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, *a, **k: forward(self, *a, **k))
        return forward

    return install


def trainer(root: Path, callbacks: TrainCallbacks, **overrides: Any) -> Trainer:
    config = faultkit.model_of(root).load_config()
    for name, value in {**SETTINGS, **overrides}.items():
        setattr(config, name, value)
    return Trainer(config, FakeHost(faultkit.layout_of(root)), callbacks)


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


def working_unet(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(faultkit.model_of(root).working / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_non_finite_loss_stops_and_keeps_the_last_good_save(
        fault: str, workspace: Callable[..., Path], faulty: Callable[..., FaultyForward]) -> None:
    root = workspace("dreambooth")
    before = working_unet(root)
    faulty({3}, fault)
    callbacks = Recorder()
    with pytest.raises(TrainingError) as caught:
        trainer(root, callbacks).run()
    message = str(caught.value)
    assert "step 3" in message and re.search(r"NaN|infinite", message)
    assert "learning rate" in message and "fp16" in message and "VAE" in message  # the likely causes
    assert callbacks.errors == [message] and "\n" not in message
    layout, model = faultkit.layout_of(root), faultkit.model_of(root)
    exports = sorted(p.name for p in layout.checkpoints_dir.glob("*.safetensors"))
    assert exports == ["tiny_1.safetensors", "tiny_2.safetensors"]
    assert all(all_finite(layout.checkpoints_dir / name) for name in exports)
    last = snapshots.list_snapshots(model.snapshots)[-1]
    assert last.name == "step-00000002" and not snapshots.read_meta(last).get("finished")
    assert all(bool(torch.isfinite(t).all()) for t in snapshots.read_snapshot(last)[0].values())
    after = working_unet(root)  # working/ is replaced only by a run's final save: untouched
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_skip_policy_skips_up_to_the_limit_then_stops(workspace: Callable[..., Path],
                                                     faulty: Callable[..., FaultyForward],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = workspace("dreambooth")
    faulty({2, 4}, "nan")
    callbacks = Recorder()
    result = trainer(root, callbacks, nan_policy="skip", max_nan_skips=2, max_train_steps=5).run()
    assert result.completed and result.step == 5
    skipped = [w for w in callbacks.warnings if "skipped" in w]
    assert len(skipped) == 2 and "max_nan_skips" in skipped[0]
    assert all_finite(faultkit.layout_of(root).checkpoints_dir / "tiny_5.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in working_unet(root).values())
    monkeypatch.undo()
    root = workspace("dreambooth")
    faulty({1, 2, 3}, "inf")
    with pytest.raises(TrainingError, match=r"step 3.*'nan_policy'"):
        trainer(root, Recorder(), nan_policy="skip", max_nan_skips=2).run()


@pytest.mark.parametrize("fault", ["oom", "oom-runtime"])
def test_out_of_memory_names_a_preset_frees_memory_and_the_service_goes_on(
        fault: str, workspace: Callable[..., Path], faulty: Callable[..., FaultyForward],
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = workspace("dreambooth", **SETTINGS)
    forward = faulty({2}, fault)
    # pytest's log capture keeps each record's traceback (and with it the model) alive; a web UI's handlers
    # format and drop it. Keep the service's records away from pytest so the test sees what the UI would.
    monkeypatch.setattr(logging.getLogger("dreambooth.service"), "propagate", False)
    service = TrainingService(FakeHost(faultkit.layout_of(root)))
    service.start(faultkit.MODEL)
    status = service.wait(timeout=600)
    assert status.state == FAILED and not service.is_busy()
    message = status.error or ""
    assert re.search(r"out of memory", message, re.I) and "preset" in message.lower(), message
    assert "\n" not in message
    gc.collect()
    assert forward.unets and all(ref() is None for ref in forward.unets), "the failed run's model is still held"
    assert service.host.released is False  # the web UI's model is back
    monkeypatch.undo()
    service.start(faultkit.MODEL)
    final = service.wait(timeout=600)
    assert final.state == FINISHED, final.error
    assert not math.isnan(final.last_loss or 0.0)
