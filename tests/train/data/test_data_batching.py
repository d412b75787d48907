"""Epoch plans: repeats, class draws, bucket-pure batches, determinism, rank split, flip and crop."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from dreambooth.config.schema import Concept, TrainingConfig, training_resolutions
from dreambooth.train.data import (
    DatasetPlan,
    ImageRecord,
    batches_per_epoch,
    bucket_for,
    bucket_spec,
    epoch_batches,
    global_batches,
    validation_batches,
)
from dreambooth.train.data.buckets import crop_offset


def record(name: str, size: tuple[int, int], concept: int = 0, is_class: bool = False) -> ImageRecord:
    return ImageRecord(Path(name), name, concept, is_class, None, size, f"hash-{name}")


def make_plan(sizes: list[tuple[int, int]], repeats: dict[int, int] | None = None,
              class_sizes: list[tuple[int, int]] | None = None) -> DatasetPlan:
    repeats = repeats or {0: 1}
    concepts = sorted(repeats)
    instance = [record(f"i{n}.png", s, concepts[n % len(concepts)]) for n, s in enumerate(sizes)]
    classes = [record(f"c{n}.png", s, concepts[n % len(concepts)], True) for n, s in enumerate(class_sizes or [])]
    return DatasetPlan(instance, classes, [], [], dict(repeats), [Concept() for _ in concepts])


def config(**overrides) -> TrainingConfig:
    values = {"resolution": 128, "bucket_min_resolution": 64, "bucket_max_resolution": 256, "bucket_step": 32,
              "train_batch_size": 2, "with_prior_preservation": False}
    values.update(overrides)
    return TrainingConfig(**values)


SIZES = [(200, 100), (100, 200), (150, 150), (300, 120), (120, 120), (128, 128), (90, 180), (400, 200)]


def flat(batches):
    return [item for batch in batches for item in batch]


def test_batches_never_mix_buckets_and_respect_batch_size() -> None:
    batches = epoch_batches(make_plan(SIZES * 3), config(train_batch_size=3), 0, 42)
    assert all(len({item.bucket for item in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 3 for batch in batches)
    assert len({batch[0].bucket for batch in batches}) > 1


def test_every_item_appears_repeats_times() -> None:
    plan = make_plan(SIZES, repeats={0: 3, 1: 5})
    counts = Counter(item.record.path.name for item in flat(epoch_batches(plan, config(), 0, 1)))
    assert counts == {r.path.name: plan.repeats[r.concept_index] for r in plan.instance}


def test_multi_resolution_trains_each_image_at_each_resolution() -> None:
    plan = make_plan([(150, 150), (300, 100)])
    cfg = config(extra_resolutions="64, 256")
    buckets = Counter((i.record.path.name, i.bucket) for i in flat(epoch_batches(plan, cfg, 0, 1)))
    expected = Counter((r.path.name, bucket_for(r.size, bucket_spec(cfg, res)))
                       for r in plan.instance for res in training_resolutions(cfg))
    assert buckets == expected and len(expected) == 6
    assert ("i0.png", (64, 64)) in buckets and ("i0.png", (256, 256)) in buckets


def test_determinism_per_seed_and_epoch() -> None:
    plan, cfg = make_plan(SIZES * 2), config(hflip=True, random_crop=True)
    assert epoch_batches(plan, cfg, 3, 7) == epoch_batches(plan, cfg, 3, 7)
    assert epoch_batches(plan, cfg, 3, 7) != epoch_batches(plan, cfg, 4, 7)
    assert epoch_batches(plan, cfg, 3, 7) != epoch_batches(plan, cfg, 3, 8)


def test_rank_split_equals_single_process_global_batches() -> None:
    # 8 square images, 8 portrait: every bucket fills whole global batches of 4.
    plan = make_plan([(100, 100)] * 8 + [(100, 200)] * 8)
    single = epoch_batches(plan, config(train_batch_size=4, hflip=True, random_crop=True), 2, 5)
    cfg = config(train_batch_size=2, hflip=True, random_crop=True)
    ranks = [epoch_batches(plan, cfg, 2, 5, world_size=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == batches_per_epoch(plan, cfg, world_size=2)
    for whole, part0, part1 in zip(single, ranks[0], ranks[1], strict=True):
        assert whole[0::2] == part0 and whole[1::2] == part1


def test_rank_split_pads_runt_batches_for_lockstep() -> None:
    plan = make_plan([(100, 100)] * 5 + [(300, 100)])
    cfg = config(train_batch_size=2)
    ranks = [epoch_batches(plan, cfg, 0, 5, world_size=3, rank=r) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    for batches in zip(*ranks, strict=True):
        assert len({len(b) for b in batches}) == 1 and len(batches[0]) >= 1
        assert len({item.bucket for b in batches for item in b}) == 1
    names = Counter(i.record.path.name for r in ranks for i in flat(r))
    assert set(names) == {f"i{n}.png" for n in range(6)}


def test_class_images_match_instance_count_and_cycle_over_epochs() -> None:
    plan = make_plan([(100, 100)] * 2, repeats={0: 2}, class_sizes=[(100, 100)] * 10)
    cfg = config(with_prior_preservation=True)
    seen = []
    for epoch in range(3):
        items = flat(epoch_batches(plan, cfg, epoch, 1))
        classes = [i.record.path.name for i in items if i.record.is_class]
        assert len(classes) == 4 == sum(not i.record.is_class for i in items)
        seen.append(set(classes))
    assert seen[0] != seen[1] and len(seen[0] | seen[1] | seen[2]) == 10
    finetune = config(with_prior_preservation=True, method="finetune")
    assert not any(i.record.is_class for i in flat(epoch_batches(plan, finetune, 0, 1)))


def test_class_images_drawn_per_concept() -> None:
    plan = make_plan([(100, 100)] * 4, repeats={0: 1, 1: 3}, class_sizes=[(100, 100)] * 4)
    items = flat(epoch_batches(plan, config(with_prior_preservation=True), 0, 1))
    per_concept = Counter((i.record.concept_index, i.record.is_class) for i in items)
    assert per_concept == {(0, False): 2, (0, True): 2, (1, False): 6, (1, True): 6}


def test_flip_and_crop_follow_settings() -> None:
    plan = make_plan([(200, 100)] * 40)
    plain = flat(epoch_batches(plan, config(), 0, 1))
    assert not any(i.flip for i in plain)
    # 200x100 -> bucket 160x96, covered by a 192x96 resize: the centre crop starts at x=16.
    assert {(i.bucket, i.crop) for i in plain} == {((160, 96), (16, 0))}
    flipped = flat(epoch_batches(plan, config(hflip=True), 0, 1))
    assert 10 < sum(i.flip for i in flipped) < 30
    cropped = flat(epoch_batches(plan, config(random_crop=True), 0, 1))
    assert len({i.crop for i in cropped}) > 3


def test_item_seeds_are_unique_within_an_epoch() -> None:
    items = flat(epoch_batches(make_plan(SIZES * 4), config(), 0, 1))
    assert len({i.seed for i in items}) == len(items)


plans = st.builds(
    lambda sizes, repeats, class_count: make_plan(sizes, {i: r for i, r in enumerate(repeats)},
                                                  [(128, 128)] * class_count),
    sizes=st.lists(st.tuples(st.integers(40, 600), st.integers(40, 600)), min_size=1, max_size=12),
    repeats=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    class_count=st.integers(0, 5),
)


@settings(max_examples=60, deadline=None)
@given(plan=plans, batch=st.integers(1, 5), world=st.integers(1, 3), extra=st.sampled_from(["", "64", "64,256"]),
       prior=st.booleans(), no_upscale=st.booleans(), seed=st.integers(0, 2**40), epoch=st.integers(0, 50))
def test_property_batching(plan: DatasetPlan, batch: int, world: int, extra: str, prior: bool,
                           no_upscale: bool, seed: int, epoch: int) -> None:
    cfg = config(train_batch_size=batch, extra_resolutions=extra, with_prior_preservation=prior,
                 bucket_no_upscale=no_upscale)
    single = epoch_batches(plan, cfg, epoch, seed)
    assert len(single) == batches_per_epoch(plan, cfg)
    assert all(len({i.bucket for i in b}) == 1 and 1 <= len(b) <= batch for b in single)
    # Every instance item exactly `repeats` times at every resolution where it has a bucket.
    got = Counter((i.record.path.name, i.bucket) for i in flat(single) if not i.record.is_class)
    expected: Counter = Counter()
    for res in training_resolutions(cfg):
        for r in plan.instance:
            bucket = bucket_for(r.size, bucket_spec(cfg, res))
            if bucket is not None:
                expected[(r.path.name, bucket)] += plan.repeats[r.concept_index]
    assert got == expected
    ranks = [epoch_batches(plan, cfg, epoch, seed, world, r) for r in range(world)]
    assert all(len(r) == batches_per_epoch(plan, cfg, world) for r in ranks)
    for step in zip(*ranks, strict=True):
        assert len({len(b) for b in step}) == 1 and len(step[0]) >= 1
        assert len({i.bucket for b in step for i in b}) == 1
    assert epoch_batches(plan, cfg, epoch, seed) == single


def test_global_batches_is_the_union_of_ranks() -> None:
    plan, cfg = make_plan(SIZES * 2), config(train_batch_size=2)
    whole = global_batches(plan, cfg, 1, 9, world_size=2)
    ranks = [epoch_batches(plan, cfg, 1, 9, 2, r) for r in range(2)]
    for batch, a, b in zip(whole, *ranks, strict=True):
        assert batch[0::2] == a and batch[1::2] == b


def test_validation_batches_are_fixed_and_unaugmented() -> None:
    plan = make_plan(SIZES)
    plan.validation, plan.instance = plan.instance[:5], plan.instance[5:]
    cfg = config(hflip=True, random_crop=True, train_batch_size=2)
    batches = validation_batches(plan, cfg, seed=5)
    items = flat(batches)
    assert sorted(i.record.path.name for i in items) == sorted(r.path.name for r in plan.validation)
    assert not any(i.flip for i in items)
    assert all(i.crop == crop_offset(i.record.size, i.bucket, None) for i in items)
    assert all(len({i.bucket for i in b}) == 1 for b in batches)
    assert validation_batches(plan, cfg, seed=5) == batches
    assert flat(epoch_batches(plan, cfg, 0, 1)) and not ({i.record for i in items}
                                                         & {i.record for i in flat(epoch_batches(plan, cfg, 0, 1))})


def test_validation_batches_split_over_ranks_with_the_runs_seeds() -> None:
    plan = make_plan(SIZES)
    plan.validation = plan.instance[:5]
    cfg = config(train_batch_size=2)
    whole = flat(validation_batches(plan, cfg, seed=5))
    ranks = [flat(validation_batches(plan, cfg, seed=5, world_size=2, rank=r)) for r in range(2)]
    assert sorted(i.record.path.name for i in ranks[0] + ranks[1]) == sorted(i.record.path.name for i in whole)
    assert not {i.record for i in ranks[0]} & {i.record for i in ranks[1]}
    # fixed per run, different between runs: the item seeds follow the run's seed
    assert [i.seed for i in whole] != [i.seed for i in flat(validation_batches(plan, cfg, seed=6))]
