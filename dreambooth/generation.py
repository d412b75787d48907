"""The one record of an image to draw: class images through a host's txt2img, and the trainer's previews.

It lives below both the host adapters and the trainer so that neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img job; `count` images with seeds seed, seed+1, ..."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg_scale: float = 7.5
    width: int = 512
    height: int = 512
    count: int = 1
    batch_size: int = 1
    # Which model to draw with: a host checkpoint file, or a diffusers folder (the embedded host).
    checkpoint: Path | None = None
    model_dir: Path | None = None
