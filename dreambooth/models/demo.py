"""Tiny demo checkpoints in the original single-file layout, for trying the tool without a real model."""

from __future__ import annotations

import json
from pathlib import Path

from .components import Components, check_family
from .export import export_checkpoint
from .loading import CONFIGS_METADATA_KEY
from .tiny import tiny_components, tiny_configs
from .tokenizer import copy_t5_tokenizer


def write_demo_checkpoint(family: str, out_path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `family` model to `out_path` (.safetensors) with its configs in the metadata.

    The configs travel in the file so that loading it builds the same tiny architecture instead of
    the full-size one shipped for real checkpoints.
    """
    # Without optional text encoders (SD3's T5): the file would need a tokenizer that no package ships.
    components = tiny_components(check_family(family), seed=seed, optional_encoders=False)
    metadata = {CONFIGS_METADATA_KEY: json.dumps(tiny_configs(family)), "dreambooth_demo": "true",
                "dreambooth_base_model": f"tiny random {family} (seed {seed})"}
    path = export_checkpoint(components, out_path, precision="fp32", metadata=metadata)
    _t5_tokenizer_beside(components, path.parent)
    return path


def _t5_tokenizer_beside(components: Components, folder: Path) -> None:
    """A T5 tokenizer folder beside the file, where a model created from it looks first (no package ships T5's
    tokenizer; the tiny one is built on the fly)."""
    for spec, tokenizer in zip(components.model_family.text_encoders, components.tokenizers, strict=True):
        if spec.layout == "t5" and tokenizer is not None:
            copy_t5_tokenizer(tokenizer, folder / spec.tokenizer_folder)
