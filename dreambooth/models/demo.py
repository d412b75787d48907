"""Tiny demo checkpoints in the original single-file layout, for trying the tool without a real model."""

from __future__ import annotations

import json
from pathlib import Path

from .components import check_family
from .export import export_checkpoint
from .loading import CONFIGS_METADATA_KEY
from .tiny import tiny_components, tiny_configs


def write_demo_checkpoint(family: str, out_path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `family` model to `out_path` (.safetensors) with its configs in the metadata.

    The configs travel in the file so that loading it builds the same tiny architecture instead of
    the full-size one shipped for real checkpoints.
    """
    # Without optional text encoders (SD3's T5): the file would need a tokenizer that no package ships.
    components = tiny_components(check_family(family), seed=seed, optional_encoders=False)
    metadata = {CONFIGS_METADATA_KEY: json.dumps(tiny_configs(family)), "dreambooth_demo": "true",
                "dreambooth_base_model": f"tiny random {family} (seed {seed})"}
    return export_checkpoint(components, out_path, precision="fp32", metadata=metadata)
