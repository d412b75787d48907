"""The demo: the world's subject as a dataset, and the settings that teach it to the world model.

The subject is one particular circle (green, with a white dot); "sks" names it and "circle" is its class,
as in the DreamBooth paper's "a [V] dog". The same settings drive the standalone app's demo model and the
measured outcomes, so what the tests measure is what a new user sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import atomic
from .scenes import subject_images

SUBJECT_PROMPT = "a sks circle"
CLASS_PROMPT = "a circle"
SUBJECT_IMAGES = 6
# DreamBooth of UNet and text encoder (the rare token "sks" starts as an untrained embedding) at a high learning
# rate for a model pretrained from scratch. The model's own schedule (v-prediction, zero terminal SNR) lets the
# caption, not the seed's noise, choose the shape's colour; offset noise still helps (measured on a pilot base:
# 90 % of seeds with it, 75 % without). Two to three minutes on 2 CPU cores.
DEMO_SETTINGS: dict[str, Any] = {
    "method": "dreambooth", "train_text_encoder": True, "with_prior_preservation": False,
    "max_train_steps": 2500, "train_batch_size": 1, "learning_rate": 4e-4, "text_encoder_lr": 4e-4,
    "lr_scheduler": "constant", "offset_noise": 0.3, "resolution": 64, "enable_bucketing": False,
    "mixed_precision": "no", "cache_latents": "memory", "sample_every_n_steps": 500, "sample_scheduler": "ddim",
    "save_on_end": True, "save_precision": "fp16", "seed": 0,
}


DEMO_CONCEPT: dict[str, Any] = {
    "instance_prompt": SUBJECT_PROMPT, "instance_token": "sks", "class_token": "circle",
    "class_prompt": CLASS_PROMPT, "sample_prompt": SUBJECT_PROMPT, "n_samples": 2, "sample_steps": 20,
    "sample_guidance_scale": 5.0, "sample_seed": 0, "class_infer_steps": 20, "class_guidance_scale": 5.0,
}


def write_subject_dataset(folder: Path, count: int = SUBJECT_IMAGES) -> Path:
    """`count` pictures of the subject as PNGs (written atomically); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (_scene, image) in enumerate(subject_images(count)):
        with atomic.atomic_path(folder / f"sks-circle-{index:02d}.png") as temp:
            image.save(temp, format="PNG")
    return folder
