"""`python -m dreambooth train`: train a model in the foreground with plain progress lines.

cli.py imports this module only when `train` runs (it loads torch and diffusers).

The CLI chooses the host (the embedded one, or a host without generation where it cannot be imported) and
passes it to the Trainer; Ctrl-C asks the loop to stop after the current step with a final save.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config.overrides import apply_overrides
from .errors import DreamboothError, TrainingError
from .store import ModelStore
from .train.events import LossRecord, Progress, TrainCallbacks, TrainCommands, TrainObserver
from .train.trainer import Trainer


class PrintCallbacks(TrainCallbacks):
    """Plain progress lines for the CLI (rank 0 only)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.last_loss: float | None = None

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def on_status(self, text: str) -> None:
        self._say(text)

    def on_loss(self, record: LossRecord) -> None:
        self.last_loss = record.loss
        if record.validation_loss is not None:
            self._say(f"step {record.step}: validation loss {record.validation_loss:.5f}")

    def on_progress(self, progress: Progress) -> None:
        loss = f" loss {self.last_loss:.5f}" if self.last_loss is not None else ""
        self._say(f"step {progress.step}/{progress.total_steps} epoch {progress.epoch + 1}/{progress.total_epochs}"
                  f"{loss} {progress.it_per_s:.2f} it/s ETA {progress.eta_s:.0f} s")

    def on_saved(self, kind: str, path: Path) -> None:
        self._say(f"saved {kind}: {path}")

    def on_sample(self, step: int, paths: list[Path], prompts: list[str]) -> None:
        self._say(f"samples at step {step}: " + ", ".join(str(p) for p in paths))

    def on_warning(self, text: str) -> None:
        self._say(f"warning: {text}")

    def on_error(self, text: str) -> None:
        self._say(f"error: {text}")


def cli_host(layout: Any) -> Any:
    try:
        from .host.embedded import EmbeddedHost
    except ImportError:
        return NullHost(layout)
    return EmbeddedHost(layout)


class NullHost:
    """A host without generation, for headless runs where the embedded host is not available."""

    name = "null"

    def __init__(self, layout: Any):
        from .host.base import NullHostMixin

        self.layout = layout
        self._mixin = NullHostMixin()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mixin, name)

    def list_checkpoints(self) -> list[Path]:
        return []

    def generate(self, request: Any) -> list[Any]:
        raise TrainingError("This run has no image generator for class images; generate them in the web UI "
                            "or put them into the concept's 'class_data_dir'.")


def run_training(layout: Any, name: str, overrides: Mapping[str, Any] | None = None, *,
                 observers: Sequence[TrainObserver] = (),
                 host_factory: Callable[[Any], Any] = cli_host) -> int:
    """Train model `name` of `layout` in the foreground; 0 when finished, 130 when stopped, 1 on an error.

    `observers` watch each step (the benchmark's step clock). Ctrl-C asks the loop to stop after the current
    step with a final save (a second Ctrl-C aborts).
    """
    config = apply_overrides(ModelStore(layout).existing(name).load_config(), overrides or {})
    main_rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    printed = PrintCallbacks(main_rank)
    commands = TrainCommands()
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_interrupt(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, previous or signal.default_int_handler)
            printed.on_status("Stopping after this step (Ctrl-C again to abort)")
            commands.stop(save=True)

        previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = Trainer(config, host_factory(layout), printed, commands, observers=observers).run()
    except DreamboothError:
        return 1  # already printed through callbacks.on_error
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0 if result.completed else 130
