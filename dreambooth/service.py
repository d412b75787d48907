"""The training service: one run at a time on a worker thread, its live status, and the GPU jobs beside it.

UI-free: the tab, the REST API and the CLI all drive training through `TrainingService`. Everything the
trainer reports arrives through `StatusCollector` (a TrainCallbacks) and is read back as a `TrainStatus`
snapshot, so no caller ever touches trainer state from another thread.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config.overrides import apply_overrides
from .config.schema import TrainingConfig
from .errors import ConfigError, DreamboothError
from .heap import return_freed_memory
from .host.base import Host
from .locks import check_free
from .quiet import third_party_quiet
from .store import ModelDir, ModelStore, unused_path
from .train.events import LossRecord, Progress, TrainCallbacks, TrainCommands

log = logging.getLogger(__name__)

# Run states, in the order a run goes through them.
IDLE, RUNNING, STOPPING, FINISHED, FAILED = "idle", "running", "stopping", "finished", "failed"
ACTIVE_STATES = (RUNNING, STOPPING)
# Loss points kept for the plot; older points are thinned (every other one dropped) beyond this.
LOSS_HISTORY_LIMIT = 4000
LIST_LIMIT = 200  # samples, saves and warnings kept in the status


class RunInProgress(DreamboothError):
    """A training run (or another GPU job of this service) is already active; the API answers 409."""


class TrainerLike(Protocol):
    def run(self) -> Any: ...


TrainerFactory = Callable[[TrainingConfig, Host, TrainCallbacks, TrainCommands], TrainerLike]


@dataclass
class TrainStatus:
    """A snapshot of the current (or last) run; safe to hand to any thread or serialise as JSON."""

    state: str = IDLE
    model: str = ""
    job: str = ""  # "train", "class_images", "export", "export_lora"
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    it_per_s: float = 0.0
    eta_s: float = 0.0
    last_loss: float | None = None
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, learning rate)
    samples: list[str] = field(default_factory=list)  # paths of the latest sampling, newest last
    sample_prompts: list[str] = field(default_factory=list)
    saved: list[tuple[str, str]] = field(default_factory=list)  # (kind, path)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["losses"] = [list(point) for point in self.losses]
        data["saved"] = [{"kind": kind, "path": path} for kind, path in self.saved]
        data["active"] = self.active
        data["fraction"] = self.fraction
        return data


def main_learning_rate(lr: dict[str, float]) -> float:
    """The learning rate plotted for a step: the UNet's when present, else the first group's."""
    if not lr:
        return 0.0
    return float(lr.get("unet", next(iter(lr.values()))))


def thin_history(points: list[Any], limit: int) -> list[Any]:
    """Drop every other point of the older half once `limit` is exceeded, keeping the whole run's shape."""
    if len(points) <= limit:
        return points
    half = len(points) // 2
    return points[:half:2] + points[half:]


class StatusCollector(TrainCallbacks):
    """Collects what the trainer reports into a TrainStatus, under a lock (callbacks come from the worker)."""

    def __init__(self, status: TrainStatus, lock: threading.Lock, host: Host | None = None):
        self._status = status
        self._lock = lock
        self._host = host

    def on_status(self, text: str) -> None:
        with self._lock:
            self._status.message = text

    def on_progress(self, progress: Progress) -> None:
        with self._lock:
            s = self._status
            s.step, s.total_steps = progress.step, progress.total_steps
            s.epoch, s.total_epochs = progress.epoch, progress.total_epochs
            s.it_per_s, s.eta_s = progress.it_per_s, progress.eta_s
            fraction, text = s.fraction, f"step {s.step}/{s.total_steps}, epoch {s.epoch}/{s.total_epochs}"
        if self._host is not None:
            self._host.progress(fraction, text)

    def on_loss(self, record: LossRecord) -> None:
        with self._lock:
            self._status.last_loss = float(record.loss)
            self._status.losses.append((record.step, float(record.loss), main_learning_rate(record.lr)))
            self._status.losses = thin_history(self._status.losses, LOSS_HISTORY_LIMIT)

    def on_sample(self, step: int, paths: list[Path], prompts: list[str]) -> None:
        with self._lock:
            self._status.samples = [str(p) for p in paths]
            self._status.sample_prompts = list(prompts)

    def on_saved(self, kind: str, path: Path) -> None:
        with self._lock:
            self._status.saved = (self._status.saved + [(kind, str(path))])[-LIST_LIMIT:]

    def on_warning(self, text: str) -> None:
        with self._lock:
            self._status.warnings = (self._status.warnings + [text])[-LIST_LIMIT:]

    def on_error(self, text: str) -> None:
        with self._lock:
            self._status.error = text


def default_trainer_factory(config: TrainingConfig, host: Host, callbacks: TrainCallbacks,
                            commands: TrainCommands) -> TrainerLike:
    from .train.trainer import Trainer  # imported late: torch and diffusers load only when training starts

    return Trainer(config, host, callbacks, commands)


def user_message(error: BaseException) -> str:
    """One line for the user: our own errors verbatim, anything else with where to look."""
    if isinstance(error, DreamboothError):
        return str(error)
    if type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower():
        return (f"Out of memory ({error}). Lower the batch size or resolution, enable gradient checkpointing, "
                "use an 8-bit optimizer or LoRA, then start again.")
    return f"{type(error).__name__}: {error} (unexpected; the full traceback is in the console log)."


class TrainingService:
    """Starts, watches and steers training runs; one GPU job at a time."""

    def __init__(self, host: Host, store: ModelStore | None = None,
                 trainer_factory: TrainerFactory | None = None):
        self.host = host
        self.store = store or ModelStore(host.layout)
        self._trainer_factory = trainer_factory or default_trainer_factory
        self._lock = threading.Lock()  # guards _status and _busy; held only briefly
        self._status = TrainStatus()
        self._busy = False
        self._commands = TrainCommands()
        self._thread: threading.Thread | None = None

    # --- status ---------------------------------------------------------------------------------
    def status(self) -> TrainStatus:
        with self._lock:
            return copy.deepcopy(self._status)

    def is_busy(self) -> bool:
        with self._lock:
            return self._busy

    def wait(self, timeout: float | None = None) -> TrainStatus:
        """Block until the current run's thread ends (tests, CLI); returns the final status."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()

    # --- training -------------------------------------------------------------------------------
    def start(self, model_name: str, config_overrides: dict[str, Any] | None = None) -> TrainStatus:
        """Start training `model_name` on a worker thread; raise RunInProgress if a GPU job is active."""
        model = self.store.existing(model_name)
        config = apply_overrides(model.load_config(), config_overrides or {})
        check_free(model.root)  # another process training it: refuse now (409), not in the worker
        self._claim(model.name, "train")
        commands = TrainCommands()
        with self._lock:
            self._commands = commands
            self._status.state = RUNNING
        thread = threading.Thread(target=self._run_training, args=(config, commands),
                                  name=f"dreambooth-train-{model.name}", daemon=True)
        self._thread = thread
        thread.start()
        return self.status()

    def cancel(self, save: bool = True) -> TrainStatus:
        """Ask the running trainer to stop at the next step, with or without a final save."""
        with self._lock:
            if self._status.state == RUNNING and self._status.job == "train":
                self._commands.stop(save)
                self._status.state = STOPPING
                self._status.message = "Stopping after the current step" + (" and saving." if save else ".")
            return copy.deepcopy(self._status)

    def save_now(self) -> None:
        with self._lock:
            self._commands.save_now()

    def sample_now(self) -> None:
        with self._lock:
            self._commands.sample_now()

    def _claim(self, model_name: str, job: str) -> None:
        """Atomically take the single GPU-job slot and reset the status, or raise RunInProgress."""
        with self._lock:
            if self._busy:
                current = self._status
                raise RunInProgress(f"{current.job or 'A job'} of model {current.model!r} is still running; "
                                    "wait for it to finish or cancel it first.")
            self._busy = True
            self._status = TrainStatus(state=RUNNING, model=model_name, job=job, started_at=time.time(),
                                       message=f"Starting {job.replace('_', ' ')}...")
        return_freed_memory()  # what the web UI freed (a model it unloaded) goes back before our job loads

    def _finish(self, error: BaseException | None) -> None:
        return_freed_memory()  # the web UI gets back what the job's models took before it reloads its own
        with self._lock:
            status = self._status
            if error is not None:
                status.state = FAILED
                status.error = status.error if isinstance(error, _ReportedFailure) else user_message(error)
                status.message = f"Failed: {status.error}"
            else:
                status.state = FINISHED
                status.message = "Stopped." if self._commands.stop_requested else "Finished."
            status.finished_at = time.time()
            self._busy = False

    def _run_training(self, config: TrainingConfig, commands: TrainCommands) -> None:
        collector = StatusCollector(self._status, self._lock, self.host)
        error: BaseException | None = None
        try:
            with self._host_released(), third_party_quiet():
                self._trainer_factory(config, self.host, collector, commands).run()
            if self.status().error:  # the trainer reported an error through on_error and returned
                error = _ReportedFailure()
        except BaseException as caught:  # the worker must always leave the service usable
            if not isinstance(caught, DreamboothError):
                log.exception("Training of %s failed", config.model_name)
            error = caught
        finally:
            self._refresh_host_lists()
            self._finish(error)

    @contextmanager
    def _host_released(self) -> Iterator[None]:
        """Hold the host's GPU queue and free its model for the duration; restore it afterwards."""
        with self.host.gpu_lock():
            self.host.release_model()
            try:
                yield
            finally:
                try:
                    self.host.restore_model()
                except Exception as error:  # a failed restore must not hide the training result
                    log.warning("Could not restore the web UI's model: %s", error)
                    self._warn(f"The web UI's model could not be reloaded ({error}); select it again.")

    def _refresh_host_lists(self) -> None:
        for refresh in (self.host.refresh_checkpoints, self.host.refresh_loras):
            try:
                refresh()
            except Exception as error:
                log.warning("Host list refresh failed: %s", error)

    def _warn(self, text: str) -> None:
        with self._lock:
            self._status.warnings.append(text)

    # --- other GPU jobs ---------------------------------------------------------------------------
    def run_job(self, model_name: str, job: str, work: Callable[[ModelDir], Any]) -> Any:
        """Run `work(model)` synchronously as a GPU job: one at a time, under the host's GPU lock."""
        model = self.store.existing(model_name)
        self._claim(model.name, job)
        error: BaseException | None = None
        try:
            with model.writer_lock(job, self._warn), self.host.gpu_lock(), third_party_quiet():
                return work(model)
        except BaseException as caught:
            error = caught
            raise
        finally:
            self._finish(error)

    def create_model(self, model_name: str, checkpoint: Path, family: str | None = None,
                     prediction_type: str | None = None) -> ModelDir:
        """Create a trainable model from a host checkpoint (which must lie inside the checkpoints folder)."""
        source = checkpoint_inside(self.host.layout.checkpoints_dir, checkpoint)
        model = self.store.model(model_name)
        if model.exists():
            raise ConfigError(f"A model named {model.name!r} already exists; choose another name or delete it.")
        from .models.loading import create_model as create

        self._claim(model.name, "create")
        error: BaseException | None = None
        try:
            with self.host.gpu_lock(), third_party_quiet():
                create(self.store, model.name, str(source), family=family, prediction_type=prediction_type)
            created = self.store.existing(model.name)
            self._apply_host_defaults(created)
            return created
        except BaseException as caught:
            error = caught
            raise
        finally:
            self._finish(error)

    def _apply_host_defaults(self, model: ModelDir) -> None:
        """Settings-tab defaults of the host (e.g. save precision) for a newly created model."""
        values = self.host.config_defaults()
        if values:
            model.save_config(apply_overrides(model.load_config(), values))

    def generate_class_images(self, model_name: str) -> int:
        """Generate the missing class images of every concept through the host's txt2img pipeline."""
        from .train.data.class_images import base_checkpoint_path, generate_class_images

        def work(model: ModelDir) -> int:
            config = model.load_config()
            collector = StatusCollector(self._status, self._lock, self.host)

            def report(done: int, total: int) -> None:
                collector.on_status(f"Generating class images: {done}/{total}")

            checkpoint = base_checkpoint_path(config.base_checkpoint, self.host.layout.checkpoints_dir)
            model_dir = model.working if model.working.is_dir() else None
            return generate_class_images(config, model.class_images, self.host, on_progress=report,
                                         checkpoint=checkpoint, model_dir=model_dir)

        return self.run_job(model_name, "class_images", work)

    def export(self, model_name: str, precision: str | None = None) -> Path:
        """Export the model as a single-file checkpoint into the host's checkpoints folder."""

        def work(model: ModelDir) -> Path:
            from .models.export import export_working

            config = model.load_config()
            target = unused_path(self.host.layout.checkpoints_dir, model.name)
            metadata = {"dreambooth_model": model.name, "base_checkpoint": config.base_checkpoint}
            export_working(model.working, target, precision or config.save_precision, metadata=metadata,
                           warn=self._warn)
            self._record_save("checkpoint", target)
            self.host.refresh_checkpoints()
            return target

        return self.run_job(model_name, "export", work)

    def export_lora(self, model_name: str, precision: str | None = None) -> Path:
        """Export the model's trained LoRA into the host's LoRA folder."""

        def work(model: ModelDir) -> Path:
            from .train.lora import export_model_lora as export

            config = model.load_config()
            target = unused_path(self.host.layout.lora_dir, model.name)
            export(model, config, target, precision or config.save_precision)
            self._record_save("lora", target)
            self.host.refresh_loras()
            return target

        return self.run_job(model_name, "export_lora", work)

    def run_tool(self, job: str, work: Callable[[], Any]) -> Any:
        """Run a model-independent job (the LoRA tools) synchronously as a GPU job: one at a time, under
        the host's GPU lock; the host's checkpoint and LoRA lists are refreshed afterwards."""
        self._claim("", job)
        error: BaseException | None = None
        try:
            with self.host.gpu_lock():
                return work()
        except BaseException as caught:
            error = caught
            raise
        finally:
            self._refresh_host_lists()
            self._finish(error)

    def _record_save(self, kind: str, path: Path) -> None:
        with self._lock:
            self._status.saved.append((kind, str(path)))


def checkpoint_inside(folder: Path, checkpoint: str | Path) -> Path:
    """Resolve `checkpoint` (relative to `folder`, or absolute) and insist it is a checkpoint file inside it."""
    root = Path(folder).resolve()
    path = Path(checkpoint)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not resolved.is_relative_to(root) or resolved == root:
        raise ConfigError(f"Checkpoint {str(checkpoint)!r} is not inside the checkpoints folder {root}; "
                          "pick one from the checkpoint list.")
    if not resolved.is_file() or resolved.suffix.lower() not in (".safetensors", ".ckpt"):
        raise ConfigError(f"Checkpoint {str(checkpoint)!r} is not a .safetensors or .ckpt file in {root}; "
                          "press Refresh and pick one from the list.")
    return resolved


class _ReportedFailure(Exception):
    """The trainer reported its error through on_error and returned False; the message is already set."""
