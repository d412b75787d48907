"""What the loop measures while it trains: speed (steps per second) and losses (summed on the device)."""

from __future__ import annotations

import time

import torch

from ..guide.memory import ItSlowdownMonitor
from .events import LossRecord, Progress
from .logs import TrainLog
from .session import Session


class StepMeter:
    """Steps per second over the run so far (excluding the first step, which includes warm-up)."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None
        self.previous: tuple[int, float] | None = None

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        self.previous, self.last = self.last, (step, now)

    def step_rate(self) -> float:
        """Steps per second over the latest interval (the slowdown monitor needs the current speed)."""
        if self.previous is None or self.last is None or self.last[0] == self.previous[0]:
            return 0.0
        return (self.last[0] - self.previous[0]) / max(1e-9, self.last[1] - self.previous[1])

    def rate(self) -> float:
        if self.first is None or self.last is None or self.last[0] == self.first[0]:
            return 0.0
        return (self.last[0] - self.first[0]) / max(1e-9, self.last[1] - self.first[1])


def watches_speed(device: torch.device) -> bool:
    # The collapse warning is for VRAM spilling into shared memory; a CPU run has no such cliff, and its
    # sampling pauses would only raise false alarms.
    return device.type == "cuda"


class SpeedReport:
    """Progress callbacks with speed and ETA, and the warning when it/s collapses (VRAM spilling)."""

    def __init__(self, session: Session):
        self.session = session
        self.meter = StepMeter(0)
        self.slowdown = ItSlowdownMonitor() if watches_speed(session.device) else None

    def step_done(self, step: int, epoch: int) -> None:
        s = self.session
        self.meter.tick(step)
        rate = self.meter.rate()
        total = s.run.total_steps
        remaining = (total - step) / rate if rate > 0 else 0.0
        s.callbacks.on_progress(Progress(step, total, epoch, s.run.total_epochs, rate, remaining))
        slowdown = self.slowdown.feed(self.meter.step_rate()) if self.slowdown else None
        if slowdown:
            s.warn(slowdown)
        if s.ranks.is_main:
            s.host.progress(step / total, f"Step {step}/{total}")


class LossMeter:
    """Training losses summed on the device between log lines (one host sync per logged interval)."""

    def __init__(self, session: Session, train_log: TrainLog):
        self.session, self.train_log = session, train_log
        device = session.device
        self.loss_sum = torch.zeros((), device=device)
        self.count = 0
        self.concept_sums = torch.zeros((2, max(1, len(session.config.concepts))), device=device)
        self.last_loss: float | None = None

    def add_step(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.count += 1

    def add_samples(self, concept_indices: list[int], per_sample: torch.Tensor) -> None:
        index = torch.tensor(concept_indices, device=self.session.device)
        self.concept_sums[0].index_add_(0, index, per_sample.float())
        self.concept_sums[1].index_add_(0, index, torch.ones_like(per_sample, dtype=torch.float32))

    def log(self, step: int, rate: float) -> None:
        if self.count == 0:
            return
        ranks = self.session.ranks
        loss = float(ranks.sum(self.loss_sum)) / (self.count * ranks.world_size)
        sums, counts = ranks.sum(self.concept_sums).tolist()
        per_concept = {i: s / n for i, (s, n) in enumerate(zip(sums, counts, strict=False)) if n > 0}
        record = LossRecord(step, loss, self.learning_rates(), per_concept)
        self.loss_sum.zero_()
        self.count = 0
        self.concept_sums.zero_()
        self.last_loss = loss
        self.session.callbacks.on_loss(record)
        self.train_log.write(record, rate)

    def log_validation(self, step: int, value: float, rate: float) -> None:
        last = self.last_loss if self.last_loss is not None else float("nan")
        record = LossRecord(step, last, self.learning_rates(), validation_loss=value)
        self.session.callbacks.on_loss(record)
        self.train_log.write(record, rate)

    def learning_rates(self) -> dict[str, float]:
        return {group["name"]: float(group["lr"]) for group in self.session.optimizer.param_groups}
