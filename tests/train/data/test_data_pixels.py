"""Pixels and masks: geometry, crop position, flip, EXIF orientation, mask weights."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dreambooth.train.data import BatchItem, load_mask, load_pixels, scan_dataset
from dreambooth.train.data.batching import epoch_batches

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(path: Path, colors: list[tuple[int, int, int]], size: tuple[int, int], vertical: bool = True) -> Path:
    """An image split into equal bands of `colors` (left to right, or top to bottom)."""
    image = Image.new("RGB", size)
    count = len(colors)
    for n, color in enumerate(colors):
        if vertical:
            box = (n * size[0] // count, 0, (n + 1) * size[0] // count, size[1])
        else:
            box = (0, n * size[1] // count, size[0], (n + 1) * size[1] // count)
        image.paste(color, box)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def colour_at(pixels: torch.Tensor, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in ((pixels[:, y, x] + 1) * 127.5).round())


def only_item(tmp_path: Path, config_for, **settings) -> tuple[BatchItem, object]:
    config = config_for("d", **settings)
    plan = scan_dataset(config)
    return epoch_batches(plan, config, 0, 0)[0][0], config


def test_pixels_shape_range_and_centre_crop(tmp_path: Path, config_for) -> None:
    bands(tmp_path / "d" / "a.png", [RED, GREEN, BLUE], (300, 100))
    item, config = only_item(tmp_path, config_for, enable_bucketing=False)
    pixels, mask = load_pixels(item, config)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32 and mask is None
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert colour_at(pixels, 32, 32) == GREEN and colour_at(pixels, 8, 2) == GREEN


def test_crop_offset_moves_the_window(tmp_path: Path, config_for) -> None:
    bands(tmp_path / "d" / "a.png", [RED, GREEN, BLUE], (300, 100))
    item, config = only_item(tmp_path, config_for, enable_bucketing=False)
    left = BatchItem(item.record, (64, 64), False, (0, 0), 0)
    right = BatchItem(item.record, (64, 64), False, (128, 0), 0)      # the resize is 192x64
    assert colour_at(load_pixels(left, config)[0], 32, 32) == RED
    assert colour_at(load_pixels(right, config)[0], 32, 32) == BLUE


def test_flip_mirrors(tmp_path: Path, config_for) -> None:
    bands(tmp_path / "d" / "a.png", [RED, BLUE], (64, 64))
    item, config = only_item(tmp_path, config_for)
    normal = load_pixels(BatchItem(item.record, (64, 64), False, (0, 0), 0), config)[0]
    flipped = load_pixels(BatchItem(item.record, (64, 64), True, (0, 0), 0), config)[0]
    assert colour_at(normal, 5, 30) == RED and colour_at(flipped, 5, 30) == BLUE
    assert torch.equal(flipped, normal.flip(-1))


def test_aspect_bucket_keeps_content(tmp_path: Path, config_for) -> None:
    bands(tmp_path / "d" / "a.png", [RED, BLUE], (256, 128))
    item, config = only_item(tmp_path, config_for, resolution=128, bucket_step=32)
    pixels, _ = load_pixels(item, config)
    assert pixels.shape[1:] == (item.bucket[1], item.bucket[0]) and item.bucket[0] > item.bucket[1]
    assert colour_at(pixels, 3, 10) == RED and colour_at(pixels, item.bucket[0] - 3, 10) == BLUE


def test_exif_rotated_photo_trains_upright(tmp_path: Path, config_for) -> None:
    # Stored 60x40 with a red top half; orientation 6 means "rotate 90 degrees clockwise to view",
    # so the viewer shows 40x60 with the red half on the right.
    stored = bands(tmp_path / "src.png", [RED, BLUE], (60, 40), vertical=False)
    image = Image.open(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    (tmp_path / "d").mkdir()
    image.save(tmp_path / "d" / "photo.jpg", quality=98, exif=exif.tobytes())
    config = config_for("d", resolution=64, bucket_step=8, bucket_min_resolution=64, bucket_no_upscale=False)
    plan = scan_dataset(config)
    assert plan.instance[0].size == (40, 60)
    item = BatchItem(plan.instance[0], (64, 64), False, (0, 16), 0)
    pixels, _ = load_pixels(item, config)
    right, left = colour_at(pixels, 60, 32), colour_at(pixels, 3, 32)
    assert right[0] > 200 and right[2] < 60 and left[2] > 200 and left[0] < 60


def _masked(tmp_path: Path, config_for, **settings):
    bands(tmp_path / "d" / "a.png", [RED, BLUE], (64, 64))
    mask = Image.new("L", (32, 32), 0)                                  # a different size than the image
    mask.paste(255, (0, 0, 16, 32))
    mask.save(tmp_path / "d" / "a-masklabel.png")
    return only_item(tmp_path, config_for, masked_training=True, **settings)


def test_mask_weights_at_latent_resolution(tmp_path: Path, config_for) -> None:
    item, config = _masked(tmp_path, config_for, unmasked_probability=0.0, unmasked_weight=0.25)
    item = BatchItem(item.record, (64, 64), False, (0, 0), item.seed)
    mask = load_mask(item, config)
    assert mask is not None and mask.shape == (1, 8, 8)
    assert torch.allclose(mask[0, :, :3], torch.ones(8, 3))
    assert torch.allclose(mask[0, :, 5:], torch.full((8, 3), 0.25))
    flipped = load_mask(BatchItem(item.record, (64, 64), True, (0, 0), item.seed), config)
    assert torch.equal(flipped, mask.flip(-1))
    assert torch.equal(load_pixels(item, config)[1], mask)


def test_mask_off_or_unmasked_probability(tmp_path: Path, config_for) -> None:
    item, config = _masked(tmp_path, config_for, unmasked_probability=1.0)
    assert load_mask(item, config) is None
    config.unmasked_probability, config.masked_training = 0.0, False
    assert load_mask(item, config) is None
    config.masked_training, config.unmasked_probability = True, 0.5
    unmasked = sum(load_mask(BatchItem(item.record, item.bucket, False, (0, 0), s), config) is None
                   for s in range(200))
    assert 60 < unmasked < 140


def test_large_jpeg_reduced_decode_matches_full_decode(tmp_path: Path, config_for) -> None:
    source = bands(tmp_path / "src.png", [RED, GREEN, BLUE], (900, 600))
    (tmp_path / "d").mkdir()
    image = Image.open(source)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "d" / "big.jpg", quality=98, exif=exif.tobytes())
    Image.open(tmp_path / "d" / "big.jpg").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "d" / "ref.png")
    config = config_for("d", resolution=64, bucket_step=16)
    plan = scan_dataset(config)
    records = {r.path.name: r for r in plan.instance}
    assert records["big.jpg"].size == records["ref.png"].size == (600, 900)
    bucket = (48, 80)
    crop = (4, 6)
    from_jpeg = load_pixels(BatchItem(records["big.jpg"], bucket, False, crop, 0), config)[0]
    from_png = load_pixels(BatchItem(records["ref.png"], bucket, False, crop, 0), config)[0]
    assert from_jpeg.shape == (3, 80, 48)
    assert (from_jpeg - from_png).abs().mean() < 0.03
    assert colour_at(from_jpeg, 24, 4)[0] > 200 and colour_at(from_jpeg, 24, 76)[2] > 200   # red top, blue bottom
