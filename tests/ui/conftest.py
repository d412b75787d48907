"""Fixtures of the tab tests: a fake host over a temporary layout, a service whose trainer is scripted."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreambooth.config.schema import TrainingConfig
from dreambooth.service import TrainingService
from dreambooth.store import Layout, ModelStore
from dreambooth.train.events import LossRecord, Progress, TrainCallbacks, TrainCommands

from fake_host import FakeHost


class ScriptedTrainer:
    """Reports `steps` steps with a loss each and one sample, then waits until cancelled when `hold` is set."""

    def __init__(self, config: TrainingConfig, callbacks: TrainCallbacks, commands: TrainCommands,
                 samples_dir: Path, hold: threading.Event | None):
        self.config, self.callbacks, self.commands = config, callbacks, commands
        self.samples_dir, self.hold = samples_dir, hold

    def run(self) -> None:
        total = self.config.max_train_steps or 4
        for step in range(1, total + 1):
            self.callbacks.on_progress(Progress(step, total, 1, 1, 2.0, (total - step) / 2.0))
            self.callbacks.on_loss(LossRecord(step, 1.0 / step, {"unet": 1e-4}))
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        sample = self.samples_dir / f"step-{total}.png"
        Image.new("RGB", (16, 16), (200, 10, 10)).save(sample)
        self.callbacks.on_sample(total, [sample], ["a red square"])
        while self.hold is not None and not self.commands.stop_requested:
            self.hold.wait(0.01)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.under(tmp_path / "models").ensure()


@pytest.fixture
def host(layout: Layout) -> FakeHost:
    return FakeHost(layout)


@pytest.fixture
def store(layout: Layout) -> ModelStore:
    return ModelStore(layout)


@pytest.fixture
def hold() -> threading.Event:
    """Set while a test wants the scripted run to keep running until it is cancelled."""
    return threading.Event()


@pytest.fixture
def service(host: FakeHost, store: ModelStore, hold: threading.Event) -> TrainingService:
    def factory(config: TrainingConfig, _host: Any, callbacks: TrainCallbacks, commands: TrainCommands) -> Any:
        samples = store.model(config.model_name).samples
        return ScriptedTrainer(config, callbacks, commands, samples, hold if hold.is_set() else None)

    return TrainingService(host, store, trainer_factory=factory)


@pytest.fixture
def model(store: ModelStore) -> str:
    """A model folder with a default config (no weights: the scripted trainer needs none)."""
    store.model("dog").save_config(TrainingConfig(max_train_steps=5))
    return "dog"
