"""The training loop: optimizer steps over epoch plans, then the after-step actions of a table.

`TrainLoop(session, checkpointer, commands).train(state)` runs from `state` to the end of the run or a stop
and says whether it stopped. Every rank steps in lockstep; decisions that depend on one rank (a command, a
non-finite loss) are agreed over all of them first.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingError
from . import loss as losses
from .checkpointer import Checkpointer, State
from .data.batching import BatchItem, validation_batches
from .events import TrainCommands
from .logs import TrainLog
from .meters import LossMeter, SpeedReport
from .objectives import Objective, load_batch, objective_for
from .optim import set_training_mode
from .session import Session


@dataclass
class Commands:
    """The commands of one step, agreed by every rank."""

    stop: bool = False
    save_on_stop: bool = False
    save: bool = False
    sample: bool = False


@dataclass(frozen=True)
class AfterStep:
    """One row of the after-step table: when `due(state, commands)`, `act(state)`; `ends` stops the run."""

    name: str
    due: Callable[[State, Commands], bool]
    act: Callable[[State], Any]
    ends: bool = False


def every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


class TrainLoop:
    def __init__(self, session: Session, checkpointer: Checkpointer, commands: TrainCommands,
                 objective: Objective | None = None):
        self.session, self.checkpointer, self.commands = session, checkpointer, commands
        self.objective = objective or objective_for(session.prediction_type)
        self.config = session.config
        self.speed = SpeedReport(session)
        names = [group["name"] for group in session.optimizer.param_groups]
        self.train_log = TrainLog(session.model_dir.logging, names, len(self.config.concepts), session.ranks.is_main)
        self.losses = LossMeter(session, self.train_log)
        self.after_step = self.after_step_table()

    def after_step_table(self) -> list[AfterStep]:
        c, total, save = self.config, self.session.run.total_steps, self.checkpointer.save
        return [
            AfterStep("log", lambda s, _: every(c.log_every_n_steps, s.step) or s.step == total, self.log),
            AfterStep("validate", lambda s, _: every(c.validation_every_n_steps, s.step), self.validate),
            AfterStep("stop and save", lambda s, cmd: cmd.stop and cmd.save_on_stop, self.save_at_stop, ends=True),
            AfterStep("stop", lambda s, cmd: cmd.stop, lambda s: None, ends=True),
            AfterStep("save", lambda s, cmd: (every(c.save_every_n_steps, s.step) and s.step < total) or cmd.save,
                      lambda s: save(s, final=False)),
            AfterStep("snapshot", lambda s, _: every(c.snapshot_every_n_steps, s.step), self.checkpointer.snapshot),
            AfterStep("sample", lambda s, cmd: cmd.sample or every(c.sample_every_n_steps, s.step),
                      lambda s: self.checkpointer.sample(s.step)),
        ]

    # --- epochs and steps ----------------------------------------------------------------------------

    def train(self, state: State) -> bool:
        """Train from `state` to the end of the run; True when a command stopped it."""
        self.session.callbacks.on_status("Training")
        if state.step > 0:
            self.train_log.drop_rows_after(state.step)  # the interrupted run's later rows are redone now
        try:
            return self._run_epochs(state)
        finally:
            self.train_log.close()

    def _run_epochs(self, state: State) -> bool:
        total = self.session.run.total_steps
        while state.step < total:
            batches = self.session.epoch_batches(state.epoch)
            size = self.config.gradient_accumulation_steps
            groups = [batches[i:i + size] for i in range(0, len(batches), size)]
            while state.group < len(groups) and state.step < total:
                if self.train_step(groups[state.group], state):
                    return True
            if state.group >= len(groups):
                state.epoch, state.group = state.epoch + 1, 0
                self.after_epoch(state)
        return False

    def train_step(self, group: list[list[BatchItem]], state: State) -> bool:
        """One optimizer step over a group of micro-batches; True when training must stop."""
        s = self.session
        if state.step == s.te_stop_step:
            s.stop_text_encoder()
        set_training_mode(s.optimizer, True)
        loss = self.accumulate(group, state.step)
        if self.finite(loss):
            self.optimizer_step()
        else:
            self.on_nonfinite(state)
        state.step += 1
        state.group += 1
        return self.run_after_step(state)

    def accumulate(self, group: list[list[BatchItem]], step: int) -> torch.Tensor:
        total = torch.zeros((), device=self.session.device)
        for index, items in enumerate(group):
            with self._no_sync(index < len(group) - 1):
                loss = self.forward(items, step) / len(group)
                self._backward(loss)
            total = total + loss.detach()
        return total

    def forward(self, items: list[BatchItem], step: int) -> torch.Tensor:
        """The weighted loss of one training micro-batch (class images weigh 'prior_loss_weight')."""
        s = self.session
        for observer in s.observers:
            observer.on_batch(step, list(items))
        batch = load_batch(s, items, step, training=True)
        if batch is None:
            # Every image of this batch vanished from disk: nothing to learn, the run goes on.
            return torch.zeros((), device=s.device, requires_grad=True)
        per_sample = self.objective.per_sample_losses(s, batch)
        weights = torch.tensor([self.config.prior_loss_weight if item.record.is_class else 1.0
                                for item in batch.items], device=s.device)
        self.losses.add_samples([item.record.concept_index for item in batch.items], per_sample.detach())
        return losses.batch_loss(per_sample, weights)

    @contextlib.contextmanager
    def _no_sync(self, skip_sync: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if skip_sync and self.session.ranks.world_size > 1:
                for module in (self.session.denoiser, *self.session.text_encoders):
                    if module is not None and hasattr(module, "no_sync"):
                        stack.enter_context(module.no_sync())
            yield

    def _backward(self, loss: torch.Tensor) -> None:
        scaler = self.session.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def optimizer_step(self) -> None:
        s = self.session
        if s.scaler is not None:
            s.scaler.unscale_(s.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in s.params if p.grad is not None], self.config.max_grad_norm,
                                           foreach=True)
        if s.scaler is not None:
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            s.optimizer.step()
        s.lr_scheduler.step()
        self.clear_gradients()

    def clear_gradients(self) -> None:
        # Freed gradients cost nothing to re-allocate on a GPU, or on CPU while freed memory stays in the
        # heap (reuse_freed_memory); elsewhere keeping the buffers is faster, for 1.2 GiB more (SD1.5, full).
        s = self.session
        s.optimizer.zero_grad(set_to_none=s.device.type == "cuda" or s.heap_reuse)

    def finite(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite; finite losses are summed on the device for the log."""
        (bad,) = self.session.ranks.any([not bool(torch.isfinite(loss))])
        if not bad:
            self.losses.add_step(loss)
        return not bad

    def on_nonfinite(self, state: State) -> None:
        self.clear_gradients()
        with warnings.catch_warnings():  # the skipped step still advances the schedule, on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.session.lr_scheduler.step()
        state.nan_skips += 1
        c = self.config
        advice = ("Likely causes: a learning rate that is too high, fp16 mixed precision (try bf16 or no), or an "
                  "fp16 VAE. The last good save and snapshot are kept.")
        if c.nan_policy == "skip" and state.nan_skips <= c.max_nan_skips:
            self.session.warn(f"Loss was not finite at step {state.step + 1}; the step was skipped "
                              f"({state.nan_skips} of at most {c.max_nan_skips}, 'max_nan_skips'). {advice}")
            return
        raise TrainingError(f"Training stopped at step {state.step + 1}: the loss became NaN or infinite "
                            f"('nan_policy' {c.nan_policy}). {advice}")

    # --- after each step and epoch -------------------------------------------------------------------

    def run_after_step(self, state: State) -> bool:
        """Run the table's due actions in order; True when one of them ends the run."""
        s = self.session
        if s.ema is not None:
            s.ema.step(state.step)
        self.speed.step_done(state.step, state.epoch)
        for observer in s.observers:
            observer.on_step(state.step)
        commands = self.poll_commands()
        for row in self.after_step:
            if row.due(state, commands):
                row.act(state)
                if row.ends:
                    return True
        return False

    def after_epoch(self, state: State) -> None:
        c = self.config
        if not c.validation_every_n_steps:
            self.validate(state)
        finished_epochs = state.epoch  # the epoch just finished, counted from 1
        if every(c.save_every_n_epochs, finished_epochs) and state.step < self.session.run.total_steps:
            self.checkpointer.save(state, final=False)

    def poll_commands(self) -> Commands:
        """Stop, save now, sample now: read on rank 0 (the UI's thread writes them), agreed by all ranks."""
        s, commands = self.session, self.commands
        main = s.ranks.is_main
        interrupted = main and s.host.interrupted()
        stop_save = main and (commands.save_on_stop or (interrupted and not commands.stop_requested))
        values = [main and (commands.stop_requested or interrupted), stop_save, main and commands.take_save(),
                  main and commands.take_sample()]
        return Commands(*s.ranks.any(values))

    def log(self, state: State) -> None:
        self.losses.log(state.step, self.speed.meter.rate())

    def save_at_stop(self, state: State) -> None:
        self.checkpointer.save(state, final=True)
        self.checkpointer.snapshot(state)

    @torch.no_grad()
    def validate(self, state: State) -> float | None:
        s = self.session
        if not s.plan.validation:  # the same on every rank: all of them take part in the sum below
            return None
        total, count = torch.zeros((), device=s.device), 0
        for items in validation_batches(s.plan, self.config, s.seed, s.ranks.world_size, s.ranks.rank):
            batch = load_batch(s, items, 0, training=False)
            if batch is not None:
                total += self.objective.per_sample_losses(s, batch).sum()
                count += len(batch.items)
        total, count = s.ranks.sum(torch.stack([total, torch.tensor(float(count), device=s.device)]))
        if count == 0:
            return None
        value = float(total) / float(count)
        self.losses.log_validation(state.step, value, self.speed.meter.rate())
        return value
