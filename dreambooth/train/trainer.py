"""The training entry point: DreamBooth (prior preservation), fine-tune and LoRA on SD1/SD2/SDXL.

`Trainer(config, host, callbacks, commands).run()` trains one model of the store and returns a TrainResult.
The run is the same for the tab (worker thread), the CLI and `accelerate launch` (data parallel: every
rank steps in lockstep, only rank 0 writes files). Commands (stop, save, sample) are polled once per
optimizer step. Every random choice is derived from (seed, epoch, item, step), so a resumed run continues
bit-identically.

The parts: `session.build_session` loads everything once, `objectives` computes the losses,
`checkpointer.Checkpointer` writes and reads snapshots and outputs, `loop.TrainLoop` runs the steps.
"""

from __future__ import annotations

import copy
import gc
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import atomic
from ..config.schema import TrainingConfig, validate
from ..errors import DreamboothError, TrainingError
from ..heap import return_freed_memory
from ..store import ModelDir, ModelStore
from . import data as data_api
from . import runtime
from .checkpointer import Checkpointer, State
from .data.class_images import base_checkpoint_path
from .data.concepts import prior_active
from .events import TrainCallbacks, TrainCommands, TrainObserver
from .loop import TrainLoop
from .session import Session, Warnings, build_session, resolve_seed


@dataclass
class TrainResult:
    """How a run ended: the last optimizer step, whether it completed or was stopped, what it wrote."""

    step: int
    total_steps: int
    epoch: int
    completed: bool
    stopped: bool
    saved: list[Path] = field(default_factory=list)
    snapshot: Path | None = None
    loss: float | None = None


class Trainer:
    """One run of one model: checks, class images, then session, loop and final saves.

    `session` holds what the run trains with once it is built (`setup()`, or `run()` until the run ends: its
    models are dropped before the host's model is loaded back); `observers` are shown the session, each batch and
    each step (events.TrainObserver)."""

    def __init__(self, config: TrainingConfig, host: Any, callbacks: TrainCallbacks | None = None,
                 commands: TrainCommands | None = None, resume: bool = True,
                 observers: Sequence[TrainObserver] = ()):
        self.config = config
        self.host = host
        self.callbacks = callbacks or TrainCallbacks()
        self.commands = commands or TrainCommands()
        self.resume = resume
        self.observers = list(observers)
        self.warn = Warnings(self.callbacks)
        self.heap_reuse = False
        self.session: Session | None = None

    # --- entry points --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            config = validate(copy.deepcopy(self.config))
            model_dir = ModelStore(self.host.layout).existing(config.model_name)
            with model_dir.writer_lock("train", self.callbacks.on_warning):  # one writer across processes
                self._remove_crash_leftovers(config, model_dir)
                self._preflight(config, model_dir)
                self._ensure_class_images(config, model_dir)
                self.host.release_model()
                try:
                    with self.host.gpu_lock():
                        return self._train_within_memory(config, model_dir)
                finally:
                    self._drop_session()
                    self.host.restore_model()
        except DreamboothError as error:
            self.callbacks.on_error(str(error))
            raise

    def setup(self) -> tuple[Session, State]:
        """Validate and load everything a run needs, without training (tests and benchmarks use it)."""
        config = validate(copy.deepcopy(self.config))
        return self._setup(config, ModelStore(self.host.layout).existing(config.model_name))

    def _setup(self, config: TrainingConfig, model_dir: ModelDir) -> tuple[Session, State]:
        session = build_session(config, model_dir, self.host, self.callbacks, self.resume, warn=self.warn,
                                observers=self.observers, heap_reuse=self.heap_reuse)
        self.session = session
        state = State()
        if session.resume_from is not None:
            state = Checkpointer(session).restore(session.resume_from)
        decision = session.resume
        (self.warn if decision.settings_changed else self.callbacks.on_status)(decision.message)
        for observer in self.observers:
            observer.on_session(session)
        return session, state

    # --- the run -------------------------------------------------------------------------------------

    def _train_within_memory(self, config: TrainingConfig, model_dir: ModelDir) -> TrainResult:
        try:
            return self._train(config, model_dir)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            message = out_of_memory_message(config, self._device_gb())
        # Outside the except block: the exception (and its frames holding tensors) is gone now.
        self._free_memory()
        raise TrainingError(message)

    def _train(self, config: TrainingConfig, model_dir: ModelDir) -> TrainResult:
        with runtime.reuse_freed_memory(enabled=not torch.cuda.is_available()) as self.heap_reuse:
            session, state = self._setup(config, model_dir)
            checkpointer = Checkpointer(session)
            loop = TrainLoop(session, checkpointer, self.commands)
            stopped = loop.train(state)
            return self._finish(session, checkpointer, loop, state, stopped)

    def _finish(self, session: Session, checkpointer: Checkpointer, loop: TrainLoop, state: State,
                stopped: bool) -> TrainResult:
        """working/ gets the trained weights of every finished or stopped run; the settings and the stop
        command decide only the exported files."""
        snapshot = None
        if not stopped:
            checkpointer.save(state, final=True, export=session.config.save_on_end)
            snapshot = checkpointer.mark_finished(state)
        else:
            saved_at_stop = self.commands.save_on_stop or not self.commands.stop_requested
            if not saved_at_stop:
                checkpointer.save(state, final=True, export=False)
            snapshot = checkpointer.latest_snapshot() if saved_at_stop else None
        self.callbacks.on_status("Training finished" if not stopped else f"Training stopped at step {state.step}")
        return TrainResult(state.step, session.run.total_steps, state.epoch, not stopped, stopped,
                           list(checkpointer.saved), snapshot, loop.losses.last_loss)

    # --- before the run ------------------------------------------------------------------------------

    def _device_gb(self) -> float | None:
        if self.session is None or self.session.device.type != "cuda":
            return None
        return torch.cuda.get_device_properties(0).total_memory / 2**30

    def _drop_session(self) -> None:
        """The run's models go, and glibc hands their memory back, before the host loads its own model again;
        kept, both were in memory at once (SDXL on CPU in SD.Next: from 14 GiB to over 22 GiB, and killed)."""
        self._free_memory()
        return_freed_memory()

    def _free_memory(self) -> None:
        """Drop every model and optimizer reference so the web UI gets its memory back."""
        self.session = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _remove_crash_leftovers(self, config: TrainingConfig, model_dir: ModelDir) -> None:
        """Temporary files of writes a crash interrupted; only this model's run writes these names."""
        atomic.remove_stale_temps(model_dir.root, recursive=True)
        for folder in (self.host.layout.checkpoints_dir, self.host.layout.lora_dir):
            atomic.remove_stale_temps(folder, prefix=f"{config.model_name}_")

    def _preflight(self, config: TrainingConfig, model_dir: ModelDir) -> None:
        try:
            checks = importlib.import_module("dreambooth.guide.preflight")
        except ImportError:
            return
        device = "cuda" if torch.cuda.is_available() else "cpu"
        native = checks.model_native_resolution(model_dir.working, config.model_family)
        findings = checks.preflight(config, device=device, native=native)
        for finding in findings:
            if finding.level != "error":
                self.warn(finding.message)
        checks.raise_on_errors(findings)
        self._check_memory(config, device, model_dir)

    def _check_memory(self, config: TrainingConfig, device: str, model_dir: ModelDir) -> None:
        """Show the memory estimate before training and warn when it exceeds the device."""
        from ..guide.memory import estimate_memory, model_params, warn_if_exceeds

        estimate = estimate_memory(config, params=model_params(model_dir.working))
        self.callbacks.on_status(f"Estimated memory for this run: {estimate.total / 2**30:.1f} GiB")
        warning = warn_if_exceeds(estimate, device_memory_bytes(device))
        if warning:
            self.warn(warning)

    def _ensure_class_images(self, config: TrainingConfig, model_dir: ModelDir) -> None:
        if not prior_active(config):
            return
        missing = sum(job.missing for job in data_api.plan_class_images(config, model_dir.class_images))
        if missing <= 0:
            return
        self.callbacks.on_status(f"Generating {missing} class images")

        def report(done: int, total: int) -> None:
            self.callbacks.on_status(f"Generating class images: {done}/{total}")
            self.host.progress(done / max(1, total), f"Class images {done}/{total}")

        # Class images come from the base model the run starts from, not from whatever the host has loaded.
        checkpoint = base_checkpoint_path(config.base_checkpoint, self.host.layout.checkpoints_dir)
        data_api.generate_class_images(config, model_dir.class_images, self.host, on_progress=report,
                                       checkpoint=checkpoint, model_dir=model_dir.working)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def out_of_memory_message(config: TrainingConfig, device_gb: float | None) -> str:
    """Name the memory preset to try and the settings it changes."""
    from ..guide.presets import memory_class, preset_for

    preset = preset_for(config.model_family, device_gb)
    changes = ", ".join(f"{key}={value}" for key, value in preset.items() if getattr(config, key, value) != value)
    size = memory_class(device_gb)
    label = f"the {size} GB preset" if size else "the CPU preset"
    return (f"Out of memory while training. Try {label} (Presets & memory tab, or set {changes or 'a lower batch size'})"
            ", or lower 'resolution' / 'train_batch_size'; the last saved files are intact.")


def device_memory_bytes(device: str) -> int | None:
    """Total memory of the training device: the GPU's, or the machine's RAM on CPU."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None  # Windows has no sysconf; no warning rather than a wrong one


__all__ = ["TrainResult", "Trainer", "resolve_seed"]
