"""What the trainer says (callbacks out) and what it is told (commands in). No UI code here."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: int
    total_epochs: int
    it_per_s: float
    eta_s: float


@dataclass
class LossRecord:
    step: int
    loss: float
    lr: dict[str, float]
    per_concept: dict[int, float] = field(default_factory=dict)
    validation_loss: float | None = None


class TrainCallbacks:
    """Override what you need; every method is a no-op by default."""

    def on_status(self, text: str) -> None: ...

    def on_progress(self, progress: Progress) -> None: ...

    def on_loss(self, record: LossRecord) -> None: ...

    def on_sample(self, step: int, paths: list[Path], prompts: list[str]) -> None: ...

    def on_saved(self, kind: str, path: Path) -> None: ...

    def on_warning(self, text: str) -> None: ...

    def on_error(self, text: str) -> None: ...


class TrainCommands:
    """Thread-safe requests from the UI or API, polled by the trainer once per step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop: bool | None = None  # None: keep going; True/False: stop with/without a final save
        self._save = False
        self._sample = False

    def stop(self, save: bool = True) -> None:
        with self._lock:
            self._stop = save

    def save_now(self) -> None:
        with self._lock:
            self._save = True

    def sample_now(self) -> None:
        with self._lock:
            self._sample = True

    @property
    def stop_requested(self) -> bool:
        return self._stop is not None

    @property
    def save_on_stop(self) -> bool:
        return bool(self._stop)

    def take_save(self) -> bool:
        with self._lock:
            wanted, self._save = self._save, False
            return wanted

    def take_sample(self) -> bool:
        with self._lock:
            wanted, self._sample = self._sample, False
            return wanted


class TrainObserver:
    """What the loop does with the data, for tests and tools that watch training (the honesty matrix): the
    session once it is built, each training batch, the captions each training batch encodes, each finished
    optimizer step. Every method is a no-op by default; observers must not change what they are shown."""

    def on_session(self, session: Any) -> None: ...

    def on_batch(self, step: int, items: list[Any]) -> None: ...

    def on_captions(self, step: int, captions: list[str]) -> None: ...

    def on_step(self, step: int) -> None: ...
