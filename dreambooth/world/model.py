"""The shapes world's base model as shipped: a tiny SD 1.x checkpoint pretrained on the world.

`resources/world/world-base.safetensors` is an original-layout single file (fp16) with its component configs
in the metadata, so it loads, trains and exports like any SD 1.x checkpoint; `resources/world/world.json`
records the recipe that built it and the digest of each shipped file. `python -m dreambooth.world.build`
rebuilds them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import ModelError
from ..families.sd1 import tiny_sd1_configs

RESOURCE_DIR = Path(__file__).resolve().parent.parent / "resources" / "world"
BASE_FILE = RESOURCE_DIR / "world-base.safetensors"
EVALUATOR_FILE = RESOURCE_DIR / "evaluator.safetensors"
RECORD_FILE = RESOURCE_DIR / "world.json"

# The VAE: 64 px pictures -> 8x8x4 latents (SD's factor 8) with few channels at full resolution, which is
# where a VAE's cost is; UNet and text encoder are the tiny SD 1.x layout every export and LoRA table is
# tested with.
WORLD_VAE: dict[str, Any] = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "block_out_channels": [8, 16, 32, 32], "norm_num_groups": 2, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 1.0}


def world_configs(scaling_factor: float = 1.0) -> dict[str, dict[str, Any]]:
    """Component configs of the world model; the VAE's scaling factor is measured when it is built."""
    configs = tiny_sd1_configs()
    configs["vae"] = {**copy.deepcopy(WORLD_VAE), "scaling_factor": scaling_factor}
    return configs


def digest(path: Path) -> str:
    """SHA-256 of a safetensors file with its header's keys sorted: the library writes the metadata in a
    random order, so two writes of the same tensors and metadata differ in bytes but not in digest."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        hashed = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
        for block in iter(lambda: handle.read(1 << 20), b""):
            hashed.update(block)
    return hashed.hexdigest()


def shipped_record() -> dict[str, Any]:
    """world.json: the recipe, the versions that built it and the digest of each shipped file."""
    if not RECORD_FILE.is_file():
        raise ModelError(f"{RECORD_FILE} is missing; rebuild the world with python -m dreambooth.world.build.")
    return json.loads(RECORD_FILE.read_text(encoding="utf-8"))


def verified(path: Path) -> Path:
    """`path` if its digest is the recorded one; a damaged or swapped file is one clear error."""
    recorded = shipped_record()["digest"].get(path.name)
    if not path.is_file() or recorded != digest(path):
        raise ModelError(f"{path} is missing or differs from the recorded build (world.json); reinstall the "
                         "extension or rebuild the world with python -m dreambooth.world.build.")
    return path


def write_world_checkpoint(out_path: str | Path) -> Path:
    """Copy the shipped base model to `out_path` (atomically), after checking it is the recorded build."""
    out = Path(out_path)
    with atomic.atomic_path(out) as temp:
        shutil.copyfile(verified(BASE_FILE), temp)
    return out
