"""Latent cache: hits, misses, invalidation by content, bucket/resolution, flip and crop; disk entries."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth.train.data import BatchItem, LatentCache, scan_dataset


class CountingEncoder:
    """Stands in for the VAE: a pooled copy of the pixels, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dim() == 4 and pixels.shape[:2] == (1, 3)
        self.calls += 1
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)                # 4 latent channels


@pytest.fixture
def item(tmp_path: Path, make_image, config_for):
    (tmp_path / "d").mkdir()
    gradient = Image.merge("RGB", [Image.linear_gradient("L").rotate(angle).resize((96, 64)) for angle in (0, 90, 45)])
    gradient.save(tmp_path / "d" / "a.png")                             # flips and crops change its pixels
    config = config_for("d")
    record = scan_dataset(config).instance[0]
    return BatchItem(record, (64, 64), False, (16, 0), 1), config


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_hit_after_miss(tmp_path: Path, item, mode: str) -> None:
    batch_item, config = item
    encode = CountingEncoder()
    cache = LatentCache(mode, tmp_path / "cache" if mode == "disk" else None)
    first = cache.get(batch_item, config, encode)
    second = cache.get(replace(batch_item, seed=99), config, encode)   # the seed does not change pixels
    assert first.shape == (4, 8, 8) and torch.equal(first, second)
    assert (encode.calls, cache.hits, cache.misses, len(cache)) == (1, 1, 1, 1)


@pytest.mark.parametrize("change", [{"flip": True}, {"crop": (0, 0)}, {"bucket": (96, 64), "crop": (0, 0)}])
def test_augmentation_or_bucket_is_a_miss(tmp_path: Path, item, change: dict) -> None:
    batch_item, config = item
    encode = CountingEncoder()
    cache = LatentCache("memory", None)
    original = cache.get(batch_item, config, encode)
    changed = cache.get(replace(batch_item, **change), config, encode)
    assert encode.calls == 2 and cache.misses == 2
    assert original.shape != changed.shape or not torch.equal(original, changed)


def test_content_change_invalidates_disk_entry(tmp_path: Path, item, make_image, config_for) -> None:
    batch_item, config = item
    encode = CountingEncoder()
    folder = tmp_path / "cache"
    LatentCache("disk", folder).get(batch_item, config, encode)
    # A new process (new cache object) finds the entry on disk.
    again = LatentCache("disk", folder)
    again.get(batch_item, config, encode)
    assert (encode.calls, again.hits) == (1, 1)
    make_image(batch_item.record.path, size=(96, 64), color=(250, 0, 0))  # the user edits the image
    record = scan_dataset(config).instance[0]
    assert record.content_hash != batch_item.record.content_hash
    fresh = again.get(replace(batch_item, record=record), config, encode)
    assert encode.calls == 2 and fresh[0].mean() > 0.9                  # red channel of the new image
    assert len(again) == 2


def test_damaged_disk_entry_is_re_encoded(tmp_path: Path, item) -> None:
    batch_item, config = item
    encode = CountingEncoder()
    cache = LatentCache("disk", tmp_path / "cache")
    cache.get(batch_item, config, encode)
    entry = cache.path(cache.key(batch_item))
    entry.write_bytes(entry.read_bytes()[:20])
    assert cache.get(batch_item, config, encode).shape == (4, 8, 8)
    assert encode.calls == 2
    assert len(list(entry.parent.glob("*.tmp"))) == 0


def test_off_mode_always_encodes_and_namespace_separates(tmp_path: Path, item) -> None:
    batch_item, config = item
    encode = CountingEncoder()
    off = LatentCache("off", None)
    off.get(batch_item, config, encode)
    off.get(batch_item, config, encode)
    assert encode.calls == 2 and len(off) == 0
    a, b = LatentCache("disk", tmp_path / "c", "vae-a"), LatentCache("disk", tmp_path / "c", "vae-b")
    assert a.key(batch_item) != b.key(batch_item)


def test_bad_modes_are_refused() -> None:
    with pytest.raises(ValueError):
        LatentCache("gpu", None)
    with pytest.raises(ValueError):
        LatentCache("disk", None)


def test_memory_entry_survives_in_place_changes(item) -> None:
    batch_item, config = item
    cache = LatentCache("memory", None)
    first = cache.get(batch_item, config, CountingEncoder())
    reference = first.clone()
    first.mul_(0.18215)                                                   # a caller scaling in place
    assert torch.equal(cache.get(batch_item, config, CountingEncoder()), reference)


def test_resolution_change_is_a_miss(tmp_path: Path, item) -> None:
    from dreambooth.train.data import epoch_batches

    _, config = item
    plan = scan_dataset(config)
    encode = CountingEncoder()
    cache = LatentCache("disk", tmp_path / "cache")
    for resolution in (64, 128, 64):
        config.resolution = resolution
        [[batch_item]] = epoch_batches(plan, config, 0, 0)
        assert cache.get(batch_item, config, encode).shape[1:] == (batch_item.bucket[1] // 8,
                                                                 batch_item.bucket[0] // 8)
    assert (encode.calls, cache.hits) == (2, 1)

