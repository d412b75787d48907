"""The shapes world's base model as shipped: a tiny SD 1.x checkpoint pretrained on the world.

`resources/world/world-base.safetensors` is an original-layout single file (fp16) with its component configs
in the metadata, stored compact: its text encoder's token embedding keeps the rows of the words the world uses
(`world_token_ids`), the others are drawn again from a fixed seed when `write_world_checkpoint` writes the full
checkpoint, which loads, trains and exports like any SD 1.x checkpoint. `resources/world/world.json` records the
recipe that built it and the digest of each shipped file. `python -m dreambooth.world.build` rebuilds them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .. import atomic
from ..errors import ModelError
from ..families.sd1 import tiny_sd1_configs
from .scenes import ALL_COLOURS, BACKGROUNDS, DOT_PHRASE, SHAPES

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


# --- the compact token embedding ------------------------------------------------------------------------------
# 49408 rows of 32 fp16 values were 3.2 MB of the 5.4 MB file, and the build trains only the rows of the words its
# captions use (its optimizer has no weight decay: the other rows stay at their random start). Those rows are
# stored; the rest are drawn again, from a fixed seed with CLIP's initial spread, when the checkpoint is written.
# "sks" (the demo's identifier) and the new colours keep their rows: DreamBooth and the fine-tune start from them.
EMBEDDING_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
ROWS_KEY, VALUES_KEY = "world_token_embedding.rows", "world_token_embedding.values"
FILL_SEED, FILL_STD = 1234, 0.02


def world_words() -> list[str]:
    """Every word a world caption, the demo's prompts or the measured outcomes use."""
    words = [*SHAPES, *ALL_COLOURS, *BACKGROUNDS, *DOT_PHRASE.split(), "a", "an", "on", "sks"]
    return sorted(set(words))


def world_token_ids(tokenizer: Any) -> list[int]:
    """The token ids of the world's words, with the tokenizer's start, end and padding tokens."""
    ids = set(tokenizer(" ".join(world_words()), padding="max_length").input_ids)
    return sorted(ids | {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id})


def compact_embedding(tensors: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with the token embedding cut to the rows in `keep` (and their ids)."""
    embedding = tensors.pop(EMBEDDING_KEY)
    rows = torch.tensor(keep, dtype=torch.int64)
    return {**tensors, ROWS_KEY: rows, VALUES_KEY: embedding[rows].contiguous(),
            "world_token_embedding.shape": torch.tensor(list(embedding.shape), dtype=torch.int64)}


def full_embedding(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `compact_embedding`: kept rows in place, every other row drawn from the fixed seed."""
    rows, values = tensors.pop(ROWS_KEY), tensors.pop(VALUES_KEY)
    shape = tuple(int(n) for n in tensors.pop("world_token_embedding.shape"))
    generator = torch.Generator().manual_seed(FILL_SEED)
    embedding = (torch.randn(shape, generator=generator) * FILL_STD).to(values.dtype)
    embedding[rows] = values
    return {**tensors, EMBEDDING_KEY: embedding}


def is_compact(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return ROWS_KEY in handle.keys()


def rewrite(source: Path, out: Path, change: Any) -> Path:
    """`source`'s tensors passed through `change`, written atomically to `out` with the same metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    with atomic.atomic_path(out) as temp:
        save_file(change(tensors), str(temp), metadata=metadata)
    return out


def write_world_checkpoint(out_path: str | Path) -> Path:
    """The shipped base model as a full SD 1.x checkpoint at `out_path` (written atomically), after checking the
    shipped file is the recorded build."""
    return rewrite(verified(BASE_FILE), Path(out_path), full_embedding)
