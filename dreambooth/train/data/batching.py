"""Epoch plans: which images train in which batch, at which bucket, flipped and cropped how.

Everything is a pure function of (plan, config, seed, epoch), so a resumed run re-creates the
same order without saved RNG state, and data-parallel ranks agree without talking.

Rules (documented for users):
- each instance image appears `repeats` times per epoch at every training resolution where it has
  a bucket; with prior preservation each concept draws as many class images as it has instance
  items, cycling through its class images and continuing where the previous epoch stopped;
- items are shuffled, grouped by bucket (a batch never mixes sizes), cut into batches, and the
  batches shuffled; a bucket's last batch may be smaller;
- with N data-parallel processes a global batch holds batch size x N items and rank r takes items
  r, r+N, ...; a smaller last batch of a bucket is padded with that bucket's first items up to a
  multiple of N so every rank steps in lockstep.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ...config.schema import TrainingConfig, training_resolutions
from .buckets import BucketSpec, bucket_for, bucket_spec, crop_offset
from .concepts import prior_active
from .scan import DatasetPlan, ImageRecord

Entry = tuple[ImageRecord, tuple[int, int]]


@dataclass(frozen=True)
class BatchItem:
    record: ImageRecord
    bucket: tuple[int, int]   # (width, height) in pixels
    flip: bool
    crop: tuple[int, int]     # (left, top) offset in the resized image
    seed: int                 # per-item seed from (run seed, epoch, position): captions, masks


def epoch_entries(plan: DatasetPlan, config: TrainingConfig, epoch: int) -> list[Entry]:
    """Unshuffled (record, bucket) pairs of one epoch: instance x repeats x resolutions, plus class draws."""
    entries: list[Entry] = []
    for spec in (bucket_spec(config, r) for r in training_resolutions(config)):
        for index in sorted(plan.repeats):
            instance = _instance_entries(plan, index, spec)
            entries += instance
            if prior_active(config):
                entries += _class_entries(plan, index, spec, len(instance), epoch)
    return entries


def _instance_entries(plan: DatasetPlan, index: int, spec: BucketSpec) -> list[Entry]:
    entries = []
    for record in plan.instance:
        bucket = bucket_for(record.size, spec) if record.concept_index == index else None
        if bucket is not None:
            entries += [(record, bucket)] * plan.repeats[index]
    return entries


def _class_entries(plan: DatasetPlan, index: int, spec: BucketSpec, count: int, epoch: int) -> list[Entry]:
    usable = [(r, bucket_for(r.size, spec)) for r in plan.class_images if r.concept_index == index]
    usable = [(r, b) for r, b in usable if b is not None]
    if not usable or not count:
        return []
    start = epoch * count
    return [usable[(start + i) % len(usable)] for i in range(count)]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k % (1 << 63) for k in keys])


def global_batches(plan: DatasetPlan, config: TrainingConfig, epoch: int, seed: int,
                   world_size: int = 1) -> list[list[BatchItem]]:
    """The epoch's global batches (batch size x world size items each, before the rank split)."""
    rng = _rng(seed, epoch)
    entries = epoch_entries(plan, config, epoch)
    shuffled = [entries[i] for i in rng.permutation(len(entries))]
    batches = _cut(_by_bucket(shuffled), config.train_batch_size * world_size, world_size)
    ordered = [batches[i] for i in rng.permutation(len(batches))]
    size = config.train_batch_size * world_size
    return [[_item(entry, config, seed, epoch, b * size + j) for j, entry in enumerate(batch)]
            for b, batch in enumerate(ordered)]


def _by_bucket(entries: list[Entry]) -> list[list[Entry]]:
    groups: dict[tuple[int, int], list[Entry]] = defaultdict(list)
    for entry in entries:
        groups[entry[1]].append(entry)
    return list(groups.values())


def _cut(groups: list[list[Entry]], size: int, world_size: int) -> list[list[Entry]]:
    batches = []
    for group in groups:
        for start in range(0, len(group), size):
            batches.append(_pad(group[start:start + size], group, world_size))
    return batches


def _pad(batch: list[Entry], group: list[Entry], world_size: int) -> list[Entry]:
    missing = -len(batch) % world_size
    return batch + [group[i % len(group)] for i in range(missing)]


def _item(entry: Entry, config: TrainingConfig, seed: int, epoch: int, position: int) -> BatchItem:
    record, bucket = entry
    keys = [k % (1 << 63) for k in (seed, epoch, position)]
    item_seed = int(np.random.SeedSequence(keys).generate_state(1)[0])
    rng = _rng(item_seed, 0)
    flip = bool(config.hflip and rng.random() < 0.5)
    crop = crop_offset(record.size, bucket, rng if config.random_crop else None)
    return BatchItem(record, bucket, flip, crop, item_seed)


def epoch_batches(plan: DatasetPlan, config: TrainingConfig, epoch: int, seed: int,
                  world_size: int = 1, rank: int = 0) -> list[list[BatchItem]]:
    """This rank's batches of one epoch; deterministic from (seed, epoch)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return [batch[rank::world_size] for batch in global_batches(plan, config, epoch, seed, world_size)]


def batches_per_epoch(plan: DatasetPlan, config: TrainingConfig, world_size: int = 1) -> int:
    """Batches per epoch (before gradient accumulation); the same for every epoch and rank. Optimizer steps:
    `runlength.plan_run_length`."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for _, bucket in epoch_entries(plan, config, 0):
        counts[bucket] += 1
    size = config.train_batch_size * world_size
    return sum(math.ceil(n / size) for n in counts.values())


def validation_batches(plan: DatasetPlan, config: TrainingConfig, seed: int, world_size: int = 1,
                       rank: int = 0) -> list[list[BatchItem]]:
    """This rank's held-out images at the base resolution: centre crop, no flip, a fixed order and item seeds
    fixed by the run's seed, so validation losses are comparable across steps. Images are dealt to the ranks
    one by one and batched by bucket; ranks may hold different counts (the losses are summed over ranks)."""
    spec = bucket_spec(config, training_resolutions(config)[0])
    items = []
    for index, record in enumerate(plan.validation):
        bucket = bucket_for(record.size, spec)
        if bucket is not None:
            crop = crop_offset(record.size, bucket, None)
            items.append(BatchItem(record, bucket, False, crop, seed * 7919 + index))
    by_bucket: dict[tuple[int, int], list[BatchItem]] = defaultdict(list)
    for item in items[rank::world_size]:
        by_bucket[item.bucket].append(item)
    size = config.train_batch_size
    return [group[i:i + size] for group in by_bucket.values() for i in range(0, len(group), size)]
