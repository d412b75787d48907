"""How long a run is: steps per epoch, total optimizer steps and epochs, from one rule.

The trainer, pre-flight, the wizard and the progress it reports all use `run_length`, so a run is as long as
every screen says. It is torch-free (pre-flight and the wizard import without torch); the bucket-aware count of
batches comes from the epoch plan (`plan_run_length`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...config.schema import TrainingConfig
    from .scan import DatasetPlan


@dataclass(frozen=True)
class RunLength:
    batches_per_epoch: int  # micro-batches of one epoch (each rank's share has as many)
    steps_per_epoch: int    # optimizer steps of one epoch (batches / gradient accumulation, rounded up)
    total_steps: int
    total_epochs: int       # epochs begun by the run (the last may be partial)


def run_length(batches_per_epoch: int, gradient_accumulation_steps: int, max_train_steps: int,
               num_train_epochs: int) -> RunLength:
    """`max_train_steps` wins when above 0; otherwise the run is `num_train_epochs` whole epochs."""
    per_epoch = max(1, math.ceil(batches_per_epoch / max(1, gradient_accumulation_steps)))
    total = max_train_steps if max_train_steps > 0 else num_train_epochs * per_epoch
    epochs = math.ceil(total / per_epoch) if total > 0 else 0
    return RunLength(batches_per_epoch, per_epoch, total, epochs)


def config_run_length(config: TrainingConfig, batches_per_epoch: int) -> RunLength:
    return run_length(batches_per_epoch, config.gradient_accumulation_steps, config.max_train_steps,
                      config.num_train_epochs)


def plan_run_length(plan: DatasetPlan, config: TrainingConfig, world_size: int = 1) -> RunLength:
    """The run length of a scanned dataset: aspect buckets, resolutions, repeats, class images and ranks."""
    from .batching import batches_per_epoch

    return config_run_length(config, batches_per_epoch(plan, config, world_size))


def counted_batches(image_counts: list[int], batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch when only image counts are known (all images in one bucket): a lower bound of the
    planned count, for the wizard's hypothetical datasets and for callers that pass counts instead of folders."""
    return math.ceil(sum(image_counts) / max(1, batch_size * world_size))


def estimate_run_length(config: TrainingConfig, class_root: Any = None) -> RunLength | None:
    """The run length of `config`'s dataset read from disk, or None when a concept cannot be scanned."""
    from ...errors import DataError
    from .scan import scan_dataset

    try:
        plan = scan_dataset(config, class_root)
    except (DataError, OSError):
        return None
    return plan_run_length(plan, config)
