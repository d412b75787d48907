"""Aspect-ratio buckets: rules by example, and hypothesis properties over random sizes and settings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreambooth.config.schema import TrainingConfig
from dreambooth.train.data.buckets import (
    bucket_for,
    bucket_list,
    bucket_spec,
    cover_size,
    crop_offset,
    nearest_bucket,
)


def spec_of(**overrides):
    values = {"resolution": 512, "bucket_min_resolution": 256, "bucket_max_resolution": 1024, "bucket_step": 64}
    values.update(overrides)
    return bucket_spec(TrainingConfig(**values), values["resolution"])


def test_bucket_list_shape() -> None:
    spec = spec_of()
    buckets = bucket_list(spec)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(256 <= min(b) and max(b) <= 1024 and b[0] * b[1] <= 512 * 512 for b in buckets)


def test_aspect_picks_matching_orientation() -> None:
    spec = spec_of()
    assert bucket_for((3000, 2000), spec) == nearest_bucket((3000, 2000), spec)
    wide, tall = bucket_for((3000, 2000), spec), bucket_for((2000, 3000), spec)
    assert wide[0] > wide[1] and tall == (wide[1], wide[0])
    assert abs(math.log(wide[0] / wide[1]) - math.log(1.5)) < 0.15
    assert bucket_for((1000, 1000), spec) == (512, 512)


def test_upscaling_allowed_by_default_and_refused_with_no_upscale() -> None:
    assert bucket_for((100, 100), spec_of()) == (512, 512)
    no_up = spec_of(bucket_no_upscale=True)
    assert bucket_for((400, 300), no_up) == (384, 256)         # own size floored to the step
    assert bucket_for((300, 300), no_up) == (256, 256)
    assert bucket_for((200, 200), no_up) is None               # below the min side: skipped
    assert bucket_for((2000, 2000), no_up) == (512, 512)       # large images still share the list buckets


def test_without_bucketing_everything_is_square() -> None:
    spec = spec_of(enable_bucketing=False)
    assert bucket_for((3000, 1000), spec) == (512, 512)
    assert bucket_for((100, 50), spec) == (512, 512)
    assert bucket_for((100, 50), spec_of(enable_bucketing=False, bucket_no_upscale=True)) is None


def test_effective_settings_are_sane() -> None:
    odd_step = spec_of(bucket_step=12)
    assert odd_step.step == 16                                 # rounded up to the VAE's factor of 8
    tiny = spec_of(resolution=64)
    assert (tiny.min_side, tiny.max_side, tiny.step) == (64, 1024, 64)
    big = spec_of(resolution=2048, bucket_max_resolution=1024)
    assert big.max_side == 2048 and (2048, 2048) in bucket_list(big)


def test_cover_and_crop() -> None:
    assert cover_size((200, 100), (64, 64)) == (128, 64)
    assert crop_offset((200, 100), (64, 64), None) == (32, 0)
    import numpy as np

    offsets = {crop_offset((200, 100), (64, 64), np.random.default_rng(s)) for s in range(50)}
    assert len(offsets) > 10 and all(0 <= left <= 64 and top == 0 for left, top in offsets)


sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
configs = st.builds(
    dict,
    resolution=st.integers(8, 160).map(lambda k: k * 8),
    bucket_step=st.integers(8, 256),
    bucket_min_resolution=st.integers(64, 1024),
    bucket_max_resolution=st.integers(64, 2048),
    enable_bucketing=st.booleans(),
    bucket_no_upscale=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(size=sizes, values=configs)
def test_property_bucket_assignment(size: tuple[int, int], values: dict) -> None:
    spec = bucket_spec(TrainingConfig(**values), values["resolution"])
    bucket = bucket_for(size, spec)
    if bucket is None:
        assert spec.no_upscale                                 # only "never enlarge" can refuse an image
        return
    width, height = bucket
    assert width % 8 == 0 and height % 8 == 0
    assert width * height <= spec.resolution ** 2
    if spec.bucketing:
        assert width % spec.step == 0 and height % spec.step == 0
        assert spec.min_side <= width <= spec.max_side and spec.min_side <= height <= spec.max_side
    if spec.no_upscale:
        assert width <= size[0] and height <= size[1]
    left, top = crop_offset(size, bucket, None)
    covered = cover_size(size, bucket)
    assert 0 <= left <= covered[0] - width and 0 <= top <= covered[1] - height


@settings(max_examples=100, deadline=None)
@given(values=configs)
def test_property_square_bucket_exists(values: dict) -> None:
    spec = bucket_spec(TrainingConfig(**values), values["resolution"])
    square = max(b[0] for b in bucket_list(spec) if b[0] == b[1])
    assert square > spec.resolution - spec.step


@pytest.mark.parametrize("size", [(4000, 10), (10, 4000), (1, 1)])
def test_extreme_aspects_without_no_upscale(size) -> None:
    bucket = bucket_for(size, spec_of())
    assert bucket is not None and min(bucket) >= 256
