"""Settings presets by model family and available memory.

For a GPU the preset is the most capable tier of a ladder (full DreamBooth with AdamW at the top, an
8-bit-optimizer LoRA with every saving at the bottom) whose memory estimate fits the memory class with
a safety margin, so a preset always fits its class per `estimate_memory` unless even the bottom tier
cannot (SDXL below 12 GB; `preset_notes` says so).  The CPU preset favours speed over memory.  Each
family's native resolution and sizes come from its family unit, so a new family needs no rows here.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace
from typing import Any

from ..config.schema import FAMILIES, TrainingConfig, text_cache_blockers
from ..errors import ConfigError
from ..families import get_family
from .memory import FIT_MARGIN, GIB, MEMORY_CLASSES_GB, estimate_memory

# The memory classes the presets overview names (the common card sizes).
OVERVIEW_CLASSES_GB = (8, 12, 16, 24)

# Memory-saving ladder, most capable first; each tier lists the fields a preset sets.
_FULL = {"method": "dreambooth", "cache_latents": "memory", "attention": "sdpa"}
_LORA = {"method": "lora", "lora_rank": 16, "cache_latents": "memory", "attention": "sdpa"}
TIERS: tuple[dict[str, Any], ...] = (
    {**_FULL, "optimizer": "adamw", "gradient_checkpointing": False, "train_text_encoder": True},
    {**_FULL, "optimizer": "adamw", "gradient_checkpointing": True, "train_text_encoder": True},
    {**_FULL, "optimizer": "adamw_8bit", "gradient_checkpointing": True, "train_text_encoder": True},
    {**_FULL, "optimizer": "adamw_8bit", "gradient_checkpointing": True, "train_text_encoder": False,
     "cache_text_encoder_outputs": "auto"},
    {**_FULL, "optimizer": "adafactor", "gradient_checkpointing": True, "train_text_encoder": False,
     "cache_text_encoder_outputs": "auto"},
    {**_LORA, "optimizer": "adamw", "gradient_checkpointing": False, "train_text_encoder": True},
    {**_LORA, "optimizer": "adamw_8bit", "gradient_checkpointing": True, "train_text_encoder": True},
    {**_LORA, "optimizer": "adamw_8bit", "gradient_checkpointing": True, "train_text_encoder": False,
     "cache_text_encoder_outputs": "auto"},
    # A quantized frozen base (bitsandbytes, as the 8-bit optimizers), for families whose presets use it (Flux).
    {**_LORA, "optimizer": "adamw_8bit", "gradient_checkpointing": True, "train_text_encoder": False,
     "cache_text_encoder_outputs": "auto", "base_quantization": "int8"},
    {**_LORA, "optimizer": "adamw_8bit", "gradient_checkpointing": True, "train_text_encoder": False,
     "cache_text_encoder_outputs": "auto", "base_quantization": "nf4"},
)

def _batch_sizes(memory_gb: int) -> tuple[int, ...]:
    """Batch sizes to try, largest first: a batch above 1 only where memory is plentiful, so a small card
    never trades a capable tier for a big batch."""
    if memory_gb >= 48:
        return (4, 2, 1)
    return (2, 1) if memory_gb >= 24 else (1,)

# CPU: RAM is plentiful and slow to fill; bf16 autocast is 2-3x faster than fp32 on recent CPUs; a LoRA
# is the only method that finishes in hours; checkpointing would only cost time.
CPU_PRESET: dict[str, Any] = {
    **_LORA, "mixed_precision": "bf16", "optimizer": "adamw", "gradient_checkpointing": False,
    "train_text_encoder": False, "cache_text_encoder_outputs": "auto", "train_batch_size": 1,
}


def memory_class(memory_gb: float | None) -> int | None:
    """The memory class (6, 8, 12, 16, 24, 48) a device falls in; None for CPU."""
    if memory_gb is None:
        return None
    fitting = [size for size in MEMORY_CLASSES_GB if size <= memory_gb + 0.5]
    return fitting[-1] if fitting else MEMORY_CLASSES_GB[0]


def _precision(memory_gb: int) -> str:
    # Cards of 8 GB and less are mostly pre-Ampere (no fast bf16); above, bf16 avoids fp16 overflow.
    return "fp16" if memory_gb <= 8 else "bf16"


def _fits(preset: dict[str, Any], family: str, budget: float) -> bool:
    config = TrainingConfig(model_family=family, resolution=get_family(family).resolution)
    for name, value in preset.items():
        setattr(config, name, value)
    return estimate_memory(config, family).total <= budget


def family_tiers(family: str) -> list[dict[str, Any]]:
    """The ladder's tiers the family can train with: those its unit accepts, quantized ones only where its presets
    use them."""
    unit = get_family(family)
    tiers = []
    for tier in TIERS:
        if "base_quantization" in tier and not unit.quantized_presets:
            continue
        try:
            unit.check_config(SimpleNamespace(**{**dataclasses.asdict(TrainingConfig()), **tier}))
        except ConfigError:
            continue
        tiers.append(tier)
    return tiers


def _ladder(family: str, memory_gb: int) -> dict[str, Any] | None:
    budget = memory_gb * GIB * FIT_MARGIN
    for tier in family_tiers(family):
        for batch in _batch_sizes(memory_gb):
            preset = {**tier, "mixed_precision": _precision(memory_gb), "train_batch_size": batch}
            preset.setdefault("cache_text_encoder_outputs", "auto")
            if _fits(preset, family, budget):
                return preset
    return None


def preset_for(family: str, memory_gb: float | None) -> dict[str, Any]:
    """Schema field -> value for a model family and the device's memory in GB (None: CPU)."""
    if family not in FAMILIES:
        raise ConfigError(f"Setting 'model_family': {family!r} is unknown; choose one of {', '.join(FAMILIES)}.")
    size = memory_class(memory_gb)
    if size is None:
        return dict(CPU_PRESET)
    found = _ladder(family, size)
    if found is None:
        bottom = {**family_tiers(family)[-1], "mixed_precision": _precision(size), "train_batch_size": 1}
        return bottom
    return found


def preset_fits(family: str, memory_gb: float | None) -> bool:
    """Whether the preset for this family and memory fits per the estimate (always True on CPU)."""
    size = memory_class(memory_gb)
    return size is None or _fits(preset_for(family, memory_gb), family, size * GIB * FIT_MARGIN)


def preset_notes(family: str, memory_gb: float | None) -> list[str]:
    """Human-readable remarks on the preset, e.g. that it does not fit."""
    size = memory_class(memory_gb)
    preset = preset_for(family, memory_gb)
    notes = []
    if size is None:
        notes.append("CPU: a bf16 LoRA with frozen, cached text encoder; expect hours, not minutes.")
    elif not preset_fits(family, memory_gb):
        bottom = family_tiers(family)[-1]
        kind = f"a LoRA on a {bottom['base_quantization']} base" if "base_quantization" in bottom else "an 8-bit LoRA"
        notes.append(f"{family} does not fit {size} GB even as {kind} with checkpointing at "
                     f"{get_family(family).resolution} px: lower 'resolution' or use a larger GPU.")
    full_weights = any(tier["method"] != "lora" for tier in family_tiers(family))
    if preset.get("method") == "lora" and full_weights:
        notes.append("Full-weight DreamBooth does not fit this memory: the preset trains a LoRA instead.")
    if preset.get("base_quantization", "none") != "none":
        notes.append(f"The frozen base is stored in {preset['base_quantization']} (bitsandbytes): the LoRA trains on "
                     "slightly rounded weights; a GPU with more memory can train on the full ones.")
    return [*notes, "What fits: " + "; ".join(preset_overview(family)) + "."]


def describe(preset: dict[str, Any]) -> str:
    """A preset in a few words: method, optimizer, what saves memory."""
    method = "LoRA" if preset["method"] == "lora" else "full DreamBooth"
    parts = [f"{method} with {preset['optimizer']}"]
    if preset.get("base_quantization", "none") != "none":
        parts.append(f"{preset['base_quantization']} base")
    if preset.get("gradient_checkpointing"):
        parts.append("gradient checkpointing")
    parts.append("text encoder trained" if preset.get("train_text_encoder") else "text encoder frozen and cached")
    return ", ".join(parts)


def preset_overview(family: str) -> list[str]:
    """What the preset of each common card size trains for this family at its native resolution."""
    rows = []
    for size in OVERVIEW_CLASSES_GB:
        preset = preset_for(family, size)
        verdict = describe(preset) if preset_fits(family, size) else "does not fit"
        rows.append(f"{size} GB: {verdict}")
    return rows


def apply_preset(config: TrainingConfig, preset: dict[str, Any]) -> TrainingConfig:
    """A copy of `config` with the preset's fields; text-encoder output caching only where it is valid
    (a frozen text encoder and fixed captions: no tag shuffling, no caption dropout)."""
    updated = copy.deepcopy(config)
    for name, value in preset.items():
        if not hasattr(updated, name):
            raise ConfigError(f"Preset field '{name}' is not a setting.")
        setattr(updated, name, value)
    if updated.cache_text_encoder_outputs == "on" and text_cache_blockers(updated):
        updated.cache_text_encoder_outputs = "auto"
    return updated
