"""One run length: the trainer, its progress reports and pre-flight agree on a dataset with aspect buckets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from spies import SessionSpy

from dreambooth.guide.preflight import run_steps
from dreambooth.train.data import scan_dataset
from dreambooth.train.data.runlength import counted_batches, plan_run_length, run_length
from dreambooth.train.events import Progress, TrainCallbacks

# Three aspect buckets at 128 px: 3 square (128x128), 3 wide (192x64), 1 tall (64x192).
SIZES = [(128, 128)] * 3 + [(256, 128)] * 3 + [(128, 256)]


def _bucketed_images(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (width, height) in enumerate(SIZES):
        pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
    return str(folder)


class Totals(TrainCallbacks):
    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()

    def on_progress(self, progress: Progress) -> None:
        self.seen.add((progress.total_steps, progress.total_epochs))


def test_trainer_progress_and_preflight_agree_on_a_bucketed_dataset(env: Any) -> None:
    env.config.concepts[0].instance_data_dir = _bucketed_images(env.root / "bucketed")
    settings = {"resolution": 128, "enable_bucketing": True, "bucket_step": 64, "with_prior_preservation": False,
                "train_batch_size": 2, "gradient_accumulation_steps": 2, "max_train_steps": 0,
                "num_train_epochs": 2, "save_on_end": False}
    config = env.configured(**settings)
    planned = plan_run_length(scan_dataset(config), config)
    # batches of 2 per bucket: 2 + 2 + 1 = 5, accumulated by 2 -> 3 steps per epoch, 2 epochs
    assert (planned.batches_per_epoch, planned.steps_per_epoch, planned.total_steps, planned.total_epochs) == (
        5, 3, 6, 2)
    # Counting images as one bucket would say ceil(7 / 2) = 4 batches, 2 steps per epoch: a run a third short.
    assert run_length(counted_batches([len(SIZES)], 2), 2, 0, 2).total_steps == 4
    assert run_steps(config, None) == planned.total_steps
    totals = Totals()
    spy = SessionSpy()
    result = env.trainer(totals, resume=False, observers=[spy], **settings).run()
    assert result.completed and result.step == planned.total_steps == result.total_steps
    assert spy.session.run == planned
    assert totals.seen == {(planned.total_steps, planned.total_epochs)}


def test_the_rule() -> None:
    assert run_length(5, 2, 0, 3) == run_length(5, 2, 0, 3)
    length = run_length(5, 2, 0, 3)
    assert (length.steps_per_epoch, length.total_steps, length.total_epochs) == (3, 9, 3)
    capped = run_length(5, 2, 7, 3)  # max_train_steps wins; the last epoch is partial
    assert (capped.total_steps, capped.total_epochs) == (7, 3)
    assert run_length(0, 4, 0, 2).steps_per_epoch == 1
