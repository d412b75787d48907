"""Aspect-ratio buckets: which pixel size each image trains at, and where it is cropped.

Rules (documented for users):
- a bucket's sides are multiples of the bucket step (rounded up to a multiple of 8, the VAE's
  factor, and at most the resolution) and its area is at most resolution^2;
- the min side is capped at the resolution and the max side raised to it, so a square bucket
  always exists whatever the min/max settings;
- each image takes the bucket whose aspect ratio is closest to its own; it is resized to cover
  the bucket (aspect kept) and cropped, at the centre or at a random offset;
- with "No upscaling" an image is never enlarged: if the closest bucket is bigger than the image
  on a side, the image gets its own bucket (its size scaled down to the resolution's area and to
  the max side, floored to the step); if that is below the min side the image is too small and is
  skipped at that resolution (listed with the reason). Without bucketing every image trains at a
  resolution x resolution square; with "No upscaling" images smaller than it are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ...config.schema import TrainingConfig

LATENT_FACTOR = 8


@dataclass(frozen=True)
class BucketSpec:
    """The effective bucket settings at one training resolution."""

    resolution: int
    step: int
    min_side: int
    max_side: int
    bucketing: bool
    no_upscale: bool

    @property
    def area(self) -> int:
        return self.resolution * self.resolution


def _floor_to(value: float, step: int) -> int:
    # The epsilon keeps 511.9999999 (float noise of an exact 512) from flooring to 448.
    return int(math.floor(value / step + 1e-9)) * step


def _ceil_to(value: float, step: int) -> int:
    return int(math.ceil(value / step - 1e-9)) * step


def bucket_spec(config: TrainingConfig, resolution: int) -> BucketSpec:
    step = min(_ceil_to(config.bucket_step, LATENT_FACTOR), _floor_to(resolution, LATENT_FACTOR))
    square = _floor_to(resolution, step)
    min_side = min(_ceil_to(config.bucket_min_resolution, step), square)
    max_side = max(_floor_to(config.bucket_max_resolution, step), square)
    return BucketSpec(resolution, step, min_side, max_side, config.enable_bucketing, config.bucket_no_upscale)


@lru_cache(maxsize=256)
def bucket_list(spec: BucketSpec) -> tuple[tuple[int, int], ...]:
    """All buckets of `spec`: for each width the tallest height that fits the area, and transposes."""
    square = _floor_to(spec.resolution, spec.step)
    buckets: set[tuple[int, int]] = {(square, square)}   # the "tallest height" rule can skip it
    for width in range(spec.min_side, spec.max_side + 1, spec.step):
        height = _floor_to(min(spec.max_side, spec.area / width), spec.step)
        if height >= spec.min_side:
            buckets.update({(width, height), (height, width)})
    return tuple(sorted(buckets))


def nearest_bucket(size: tuple[int, int], spec: BucketSpec) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (log distance); ties go to the larger area."""
    target = math.log(size[0] / size[1])
    return min(bucket_list(spec), key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1], b))


@lru_cache(maxsize=65536)
def bucket_for(size: tuple[int, int], spec: BucketSpec) -> tuple[int, int] | None:
    """The (width, height) an image of `size` trains at, or None when it is too small (no upscaling)."""
    width, height = size
    if not spec.bucketing:
        square = (spec.resolution, spec.resolution)
        fits = width >= spec.resolution and height >= spec.resolution
        return square if fits or not spec.no_upscale else None
    bucket = nearest_bucket(size, spec)
    if not spec.no_upscale or (bucket[0] <= width and bucket[1] <= height):
        return bucket
    return _own_bucket(size, spec)


def _own_bucket(size: tuple[int, int], spec: BucketSpec) -> tuple[int, int] | None:
    width, height = size
    scale = min(1.0, math.sqrt(spec.area / (width * height)), spec.max_side / width, spec.max_side / height)
    own = (_floor_to(width * scale, spec.step), _floor_to(height * scale, spec.step))
    return own if min(own) >= spec.min_side else None


def too_small_reason(size: tuple[int, int], specs: list[BucketSpec]) -> str:
    smallest = min(specs, key=lambda s: s.min_side if s.bucketing else s.resolution)
    side = smallest.min_side if smallest.bucketing else smallest.resolution
    return (f"is {size[0]}x{size[1]}, smaller than the smallest bucket ({side} px side) and 'No upscaling' is on; "
            "use a larger image, lower 'Bucket min side' or turn off 'No upscaling'")


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size the image is resized to (aspect kept) so that it covers the bucket."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


def crop_offset(size: tuple[int, int], bucket: tuple[int, int], rng: np.random.Generator | None) -> tuple[int, int]:
    """(left, top) of the bucket inside the resized image: centred, or uniformly random with `rng`."""
    covered = cover_size(size, bucket)
    slack = covered[0] - bucket[0], covered[1] - bucket[1]
    if rng is None:
        return slack[0] // 2, slack[1] // 2
    return int(rng.integers(0, slack[0] + 1)), int(rng.integers(0, slack[1] + 1))


def source_box(size: tuple[int, int], bucket: tuple[int, int],
               crop: tuple[int, int]) -> tuple[float, float, float, float]:
    """The crop expressed in the original image's pixels, so one resize does scale and crop at once."""
    covered = cover_size(size, bucket)
    scale_x, scale_y = covered[0] / size[0], covered[1] / size[1]
    left, top = crop
    # Clamped so float round-off (or a crop planned for a slightly different size) stays inside.
    right, bottom = min(size[0], (left + bucket[0]) / scale_x), min(size[1], (top + bucket[1]) / scale_y)
    return (max(0.0, min(left / scale_x, right - 1)), max(0.0, min(top / scale_y, bottom - 1)), right, bottom)
