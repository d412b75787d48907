"""Learning-rate schedules as pure factor functions, wrapped in a LambdaLR, and LR scaling by batch size.

Every schedule is `factor(step)` in [0, 1] multiplying each parameter group's own learning rate. The
decaying ones reach 0 at `decay_steps` = run length x lr_decay_past_end (EveryDream2 decays a little past
the end so the last steps still learn); warmup -1 means 2 % of the decay steps (EveryDream2's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

SQRT_SCALE_POWER = 0.55  # EveryDream2's exponent, derived from SD's own LR/batch pairs


@dataclass(frozen=True)
class ScheduleShape:
    kind: str
    warmup_steps: int
    decay_steps: int
    cycles: int = 1
    power: float = 1.0


def shape_for(config: Any, total_steps: int) -> ScheduleShape:
    decay_steps = max(1, round(total_steps * config.lr_decay_past_end))
    warmup = config.lr_warmup_steps
    if warmup < 0:
        warmup = round(0.02 * decay_steps)
    return ScheduleShape(config.lr_scheduler, warmup, decay_steps, config.lr_cycles, config.lr_power)


def _progress(step: int, shape: ScheduleShape) -> float:
    span = max(1, shape.decay_steps - shape.warmup_steps)
    return min(1.0, max(0.0, (step - shape.warmup_steps) / span))


def _cosine(p: float, _: ScheduleShape) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _cosine_restarts(p: float, shape: ScheduleShape) -> float:
    if p >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((shape.cycles * p) % 1.0)))


def _rex(p: float, _: ScheduleShape) -> float:
    # Reflected exponential (Chen et al. 2021): slow decay first, fast at the end.
    return (1.0 - p) / (1.0 - 0.5 * p)


DECAYS: dict[str, Callable[[float, ScheduleShape], float]] = {
    "constant": lambda p, s: 1.0,
    "constant_with_warmup": lambda p, s: 1.0,
    "linear": lambda p, s: 1.0 - p,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_restarts,
    "polynomial": lambda p, s: (1.0 - p) ** s.power,
    "rex": _rex,
}


def lr_factor(step: int, shape: ScheduleShape) -> float:
    """The LR multiplier at optimizer step `step` (0-based). Warmup ramps (step+1)/(warmup+1): never 0."""
    if shape.kind not in DECAYS:
        raise ConfigError(f"Setting 'lr_scheduler': {shape.kind!r} is unknown; choose one of {', '.join(DECAYS)}.")
    if shape.kind != "constant" and step < shape.warmup_steps:
        return (step + 1) / (shape.warmup_steps + 1)
    return max(0.0, DECAYS[shape.kind](_progress(step, shape), shape))


def build_scheduler(optimizer: torch.optim.Optimizer, config: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    shape = shape_for(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, shape))


def lr_curve(config: Any, total_steps: int) -> list[float]:
    """The factor at each step of a run (for tests, the UI's preview and the honesty matrix)."""
    shape = shape_for(config, total_steps)
    return [lr_factor(step, shape) for step in range(total_steps)]


def lr_scale(config: Any, world_size: int = 1) -> float:
    """Multiplier of every learning rate from scale_lr and the effective batch (batch x accumulation x ranks)."""
    effective = config.train_batch_size * config.gradient_accumulation_steps * world_size
    if config.scale_lr == "linear":
        return float(effective)
    if config.scale_lr == "sqrt":
        return float(effective**SQRT_SCALE_POWER)
    return 1.0
