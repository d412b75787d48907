"""Pixels and loss masks of one batch item, at its bucket size, cropped and flipped as planned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...config.schema import TrainingConfig
from ...errors import DataError
from .batching import BatchItem
from .buckets import LATENT_FACTOR, cover_size, source_box
from .images import ImageProblem, open_mask, open_rgb


def load_pixels(item: BatchItem, config: TrainingConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((3,H,W) float32 in [-1,1] at item.bucket, latent-resolution loss weights or None)."""
    record = item.record
    needed = cover_size(record.size, item.bucket)
    image = _read(record.path, lambda: open_rgb(record.path, record.content_hash, needed))
    pixels = to_tensor(render(image, item, _resample(record.size, item.bucket)))
    return pixels, load_mask(item, config)


def _read(path: Path, reader):  # type: ignore[no-untyped-def]
    try:
        return reader()
    except ImageProblem as problem:
        raise DataError(f"Training image {path} {problem}.") from None


def _resample(size: tuple[int, int], bucket: tuple[int, int]) -> Image.Resampling:
    enlarging = bucket[0] > size[0] or bucket[1] > size[1]
    return Image.Resampling.BICUBIC if enlarging else Image.Resampling.LANCZOS


def render(image: Image.Image, item: BatchItem, resample: Image.Resampling) -> Image.Image:
    """Scale (aspect kept) and crop in one resize, then flip.

    The crop was planned on the record's full size; a JPEG decoded at reduced scale gets the same
    box scaled to its size.
    """
    full = item.record.size
    box = source_box(full, item.bucket, item.crop)
    if image.size != full:
        fx, fy = image.size[0] / full[0], image.size[1] / full[1]
        box = (box[0] * fx, box[1] * fy, min(image.size[0], box[2] * fx), min(image.size[1], box[3] * fy))
    out = image.resize(item.bucket, resample, box=box, reducing_gap=3.0)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if item.flip else out


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def mask_is_used(item: BatchItem, config: TrainingConfig) -> bool:
    """Masked training, a mask file, and not one of the `unmasked_probability` items (seeded)."""
    if not config.masked_training or item.record.mask_path is None:
        return False
    return not np.random.default_rng([item.seed, 2]).random() < config.unmasked_probability


def load_mask(item: BatchItem, config: TrainingConfig) -> torch.Tensor | None:
    """(1, H/8, W/8) loss weights in [unmasked_weight, 1]: white trains fully, black at the floor.

    None means uniform weights (masked training off, no mask file, or an unmasked-probability item).
    Normalising by the masked area is the loss's job.
    """
    if not mask_is_used(item, config):
        return None
    path = item.record.mask_path
    mask = _read(path, lambda: open_mask(path, item.record.size))
    latent_size = (item.bucket[0] // LATENT_FACTOR, item.bucket[1] // LATENT_FACTOR)
    full = render(mask, item, Image.Resampling.BILINEAR)
    small = full.resize(latent_size, Image.Resampling.BOX)
    values = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)
    floor = float(config.unmasked_weight)
    return (floor + (1.0 - floor) * values).unsqueeze(0)
