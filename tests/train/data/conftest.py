"""Fixtures of the data tests: tiny image folders and configs built in tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreambooth.config.schema import Concept, TrainingConfig


def write_image(path: Path, size: tuple[int, int] = (64, 64), color: Any = (200, 30, 30), mode: str = "RGB",
                **save_args: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_args)
    return path


def small_config(**overrides: Any) -> TrainingConfig:
    """64-128 px settings that keep image work tiny; concepts come from the test."""
    values: dict[str, Any] = {"resolution": 64, "bucket_min_resolution": 64, "bucket_max_resolution": 256,
                              "bucket_step": 16, "train_batch_size": 1, "with_prior_preservation": False,
                              "cache_latents": "off"}
    values.update(overrides)
    return TrainingConfig(**values)


@pytest.fixture
def make_image() -> Callable[..., Path]:
    return write_image


@pytest.fixture
def config_for(tmp_path: Path) -> Callable[..., TrainingConfig]:
    """config_for(folder, **settings): one concept on `folder` (relative names go under tmp_path)."""

    def build(*folders: Path | str, concept: dict[str, Any] | None = None, **settings: Any) -> TrainingConfig:
        concepts = [Concept(instance_data_dir=str(tmp_path / f), **(concept or {})) for f in folders]
        return small_config(concepts=concepts, **settings)

    return build
