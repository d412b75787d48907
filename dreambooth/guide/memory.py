"""Estimate of the device memory a training config needs, and a monitor for collapsing it/s.

The estimate adds up weights, gradients, optimizer state, activations and a fixed runtime overhead
from the parameter counts of the real architectures and per-dtype / per-optimizer byte factors.  It is
a planning aid (within roughly +-30 % of what the trainer peaks at), not a measurement.
"""

from __future__ import annotations

import json
import statistics
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import TrainingConfig, caches_text_outputs
from ..families import get_family

GIB = 1024 ** 3
# Bytes per weight of a quantized frozen base ('base_quantization'): NF4 packs two weights per byte plus an fp8
# scale per 64 weights and an fp32 scale per 256 of those (double quantization); int8 keeps an fp32 scale per
# row; fp8 one byte. "none": the compute dtype's.
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0 + 4 / 3072, "fp8": 1.0}

# Parameter counts of the real architectures (diffusers models, counted with sum(p.numel())).
PARAMS: dict[str, dict[str, int]] = {
    "sd1": {"unet": 859_520_964, "te": 123_060_480, "vae": 83_653_863},
    "sd2": {"unet": 865_910_724, "te": 340_387_840, "vae": 83_653_863},
    "sd2v": {"unet": 865_910_724, "te": 340_387_840, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "te": 123_060_480, "te2": 694_659_840, "vae": 83_653_863},
    # SD 3.5 Medium (the transformer under 'unet'); T5-XXL (4.76 B, never trained) is not counted yet.
    "sd3": {"unet": 2_243_171_520, "te": 123_650_304, "te2": 694_659_840, "vae": 83_819_683},
}
# LoRA parameters per rank of a transformer's adapted layers (counted on the real config): SD 3.5 Medium's
# attention projections (families/sd3.ATTENTION_TARGETS).
DENOISER_LORA_PER_RANK = {"sd3": 746_496}

# Transformer layout per family for LoRA sizes: (channels, transformer blocks at that width) of the UNet,
# the cross-attention width, and (layers, width, MLP width) of each text encoder.
UNET_BLOCKS: dict[str, tuple[tuple[int, int], ...]] = {
    "sd1": ((320, 5), (640, 5), (1280, 6)),
    "sd2": ((320, 5), (640, 5), (1280, 6)),
    "sd2v": ((320, 5), (640, 5), (1280, 6)),
    "sdxl": ((640, 10), (1280, 60)),
}
UNET_TRANSFORMER_MODELS: dict[str, tuple[tuple[int, int], ...]] = {
    "sd1": ((320, 5), (640, 5), (1280, 6)),
    "sd2": ((320, 5), (640, 5), (1280, 6)),
    "sd2v": ((320, 5), (640, 5), (1280, 6)),
    "sdxl": ((640, 5), (1280, 6)),
}
CROSS_ATTENTION_WIDTH = {"sd1": 768, "sd2": 1024, "sd2v": 1024, "sdxl": 2048}
TEXT_ENCODERS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "sd1": ((12, 768, 3072),),
    "sd2": ((23, 1024, 4096),),
    "sd2v": ((23, 1024, 4096),),
    "sdxl": ((12, 768, 3072), (32, 1280, 5120)),
    "sd3": ((12, 768, 3072), (32, 1280, 5120)),
}

# Activation memory of one sample at the family's native resolution in 16-bit compute, without
# checkpointing (SDPA attention).  Calibrated on published numbers: SD1.5 LoRA at 512 fits 6 GB only with
# checkpointing; SDXL LoRA at 1024 needs ~24 GB without it and ~12 GB with it.
ACTIVATIONS_PER_SAMPLE = {"sd1": 3.0 * GIB, "sd2": 3.2 * GIB, "sd2v": 3.2 * GIB, "sdxl": 10.0 * GIB,
                          "sd3": 8.0 * GIB}  # SD3: not calibrated yet (4096 image tokens + 333 text tokens)
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2v": 768, "sdxl": 1024, "sd3": 1024}
CHECKPOINTING_FACTOR = 0.2  # only the block inputs are kept; the rest is recomputed in backward
TEXT_ENCODER_ACTIVATION_FRACTION = 0.05  # 77 tokens: small next to the UNet's
RUNTIME_OVERHEAD = int(0.75 * GIB)  # CUDA context, allocator slack, the batch itself

# Bytes per parameter of optimizer state.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0, "adamw_8bit": 2.0, "lion": 4.0, "lion_8bit": 1.0, "prodigy": 16.0,
    "adafactor": 0.05, "adamw_schedulefree": 8.0,
}
COMPUTE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
MASTER_BYTES = 4  # trained weights and their gradients stay fp32


@dataclass
class MemoryEstimate:
    """Bytes per part of a training run on one device."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    activations_other_checkpointing: int
    trainable_params: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer state": self.optimizer,
                "activations": self.activations, "overhead": self.overhead}

    def lines(self) -> list[str]:
        rows = [f"{name:<16} {value / GIB:6.2f} GiB" for name, value in self.parts().items()]
        return rows + [f"{'total':<16} {self.total / GIB:6.2f} GiB"]


# Each part's folder in a diffusers folder (working/), for counting the real model's parameters: the denoiser is
# a UNet, or a transformer (Flux); large parts are split into several files (model-00001-of-00003.safetensors).
PART_FOLDERS = {"unet": ("unet", "transformer"), "te": ("text_encoder",), "te2": ("text_encoder_2",),
                "vae": ("vae",)}


def family_of(config: TrainingConfig, family: str | None) -> str:
    return family or config.model_family


def safetensors_params(path: Path) -> int:
    """Parameters in a .safetensors file, from its header alone (no tensor is read)."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    count = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count += _product(entry["shape"])
    return count


def _product(shape: list[int]) -> int:
    total = 1
    for extent in shape:
        total *= int(extent)
    return total


def model_params(folder: Path | None) -> dict[str, int] | None:
    """Parameter counts per part of the diffusers model in `folder` (a model's working/), or None when it
    has no readable denoiser (then the estimate uses the real architecture's counts)."""
    if folder is None:
        return None
    counts = {}
    try:
        for part, names in PART_FOLDERS.items():
            files = [path for name in names for path in sorted((Path(folder) / name).glob("*.safetensors"))]
            if files:
                counts[part] = sum(safetensors_params(path) for path in files)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return counts if counts.get("unet") else None


def lora_params_per_rank(family: str, text_encoder: bool) -> int:
    """LoRA parameters per unit of rank: sum of (in + out) over the adapted linear layers.

    UNet transformer block: self-attention q,k,v,out (8C), cross-attention q,out (4C) and k,v from the
    text width D (2D + 2C), feed-forward GEGLU C->8C and 4C->C (14C); each transformer also has
    proj_in/proj_out (4C).  Text-encoder layer: q,k,v,out (8W) and fc1/fc2 (2(W + M)).
    """
    if family in DENOISER_LORA_PER_RANK:
        unet = DENOISER_LORA_PER_RANK[family]
    else:
        cross = CROSS_ATTENTION_WIDTH[family]
        unet = sum(n * (28 * c + 2 * cross) for c, n in UNET_BLOCKS[family])
        unet += sum(n * 4 * c for c, n in UNET_TRANSFORMER_MODELS[family])
    if not text_encoder:
        return unet
    te = sum(layers * (8 * width + 2 * (width + mlp)) for layers, width, mlp in TEXT_ENCODERS[family])
    return unet + te


@dataclass(frozen=True)
class FamilyFacts:
    """What the estimate needs of a family's real model: parameter counts ('unet' for the denoiser, 'te', 'te2',
    'vae'), LoRA parameters per unit of rank (denoiser; text encoders), activations of one sample at the native
    resolution in 16-bit compute without checkpointing, and the share checkpointing keeps."""

    params: Mapping[str, int]
    lora_denoiser: int
    lora_text: int
    activation_bytes: float
    resolution: int
    checkpointing_factor: float = CHECKPOINTING_FACTOR


def family_facts(family: str) -> FamilyFacts:
    """A family unit's own facts (counted from its shipped configs), else the tables above."""
    own = get_family(family).memory_facts()
    if own is not None:
        return FamilyFacts(**own)
    denoiser = lora_params_per_rank(family, False)
    return FamilyFacts(PARAMS[family], denoiser, lora_params_per_rank(family, True) - denoiser,
                       ACTIVATIONS_PER_SAMPLE[family], NATIVE_RESOLUTION[family])


def native_resolution(family: str) -> int:
    return family_facts(family).resolution


def _text_encoder_params(params: Mapping[str, int]) -> int:
    return params.get("te", 0) + params.get("te2", 0)


def _scale(params: Mapping[str, int], facts: FamilyFacts) -> float:
    """How the model compares with the real architecture (1.0 for it; tiny test models are far smaller)."""
    return params["unet"] / facts.params["unet"]


def _trainable_params(config: TrainingConfig, facts: FamilyFacts, params: Mapping[str, int]) -> int:
    train_te = config.train_text_encoder
    if config.method == "lora":
        per_rank = (facts.lora_denoiser + (facts.lora_text if train_te else 0)) * _scale(params, facts)
        return int(config.lora_rank * per_rank * (2 if config.use_dora else 1))
    trainable = params["unet"] if config.train_unet else 0
    return trainable + (_text_encoder_params(params) if train_te else 0)


def _frozen_bytes(config: TrainingConfig, params: Mapping[str, int]) -> float:
    """Bytes of the weights held on the device without being trained: in the compute dtype, the denoiser of a
    LoRA on a quantized base in its storage ('base_quantization')."""
    compute = COMPUTE_BYTES[config.mixed_precision]
    frozen = 0.0
    if config.method == "lora" or not config.train_unet:
        quantized = config.method == "lora" and config.base_quantization != "none"
        frozen += params["unet"] * (QUANTIZED_BYTES[config.base_quantization] if quantized else compute)
    te_needed = not caches_text_outputs(config) or config.train_text_encoder
    if te_needed and (config.method == "lora" or not config.train_text_encoder):
        frozen += _text_encoder_params(params) * compute
    if config.cache_latents == "off":
        frozen += params.get("vae", 0) * compute
    return frozen


def _activations(config: TrainingConfig, facts: FamilyFacts, checkpointing: bool, scale: float = 1.0) -> int:
    area = (config.resolution / facts.resolution) ** 2
    per_sample = facts.activation_bytes * area * scale
    if config.train_text_encoder:
        per_sample *= 1 + TEXT_ENCODER_ACTIVATION_FRACTION
    scale = COMPUTE_BYTES[config.mixed_precision] / 2
    factor = facts.checkpointing_factor if checkpointing else 1.0
    return int(per_sample * config.train_batch_size * scale * factor)


def estimate_memory(config: TrainingConfig, family: str | None = None,
                    params: Mapping[str, int] | None = None) -> MemoryEstimate:
    """Bytes the config needs on one device (defaults to the config's model family).

    `params` are the parameter counts of the model really trained (see `model_params`); without them the
    real architecture's are used. Activations scale with the denoiser's size relative to the real one.
    """
    facts = family_facts(family_of(config, family))
    params = params if params and params.get("unet") else facts.params
    scale = _scale(params, facts)
    trainable = _trainable_params(config, facts, params)
    ema = trainable * MASTER_BYTES if config.use_ema else 0
    weights = int(trainable * MASTER_BYTES + _frozen_bytes(config, params) + ema)
    state = int(trainable * OPTIMIZER_STATE_BYTES.get(config.optimizer, 8.0))
    checkpointing = config.gradient_checkpointing
    return MemoryEstimate(weights=weights, gradients=trainable * MASTER_BYTES, optimizer=state,
                          activations=_activations(config, facts, checkpointing, scale), overhead=RUNTIME_OVERHEAD,
                          activations_other_checkpointing=_activations(config, facts, not checkpointing, scale),
                          trainable_params=trainable)


def warn_if_exceeds(estimate: MemoryEstimate, device_bytes: int | None) -> str | None:
    """A one-line warning naming the settings to change when the estimate exceeds the device."""
    if not device_bytes or estimate.total <= device_bytes:
        return None
    need, have = estimate.total / GIB, device_bytes / GIB
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in estimate.parts().items())
    return (f"Estimated memory {need:.1f} GiB exceeds the device's {have:.1f} GiB ({parts} GiB): turn on "
            "'gradient_checkpointing', pick an 8-bit 'optimizer', lower 'train_batch_size' or 'resolution', "
            "or use method 'lora' (a preset for your memory does this).")


class ItSlowdownMonitor:
    """Warns once when it/s collapses below a fraction of its running median after a warm-up.

    On Windows the NVIDIA driver spills VRAM into shared system memory instead of failing with out of
    memory; training then continues several times slower.  A sustained drop (not one slow step for a
    save or a sample) is the symptom.
    """

    def __init__(self, warmup_steps: int = 10, ratio: float = 0.4, sustain: int = 5, window: int = 200) -> None:
        self.warmup_steps = warmup_steps
        self.ratio = ratio
        self.sustain = sustain
        self.window = window
        self._history: list[float] = []
        self._slow_run = 0
        self.warned = False

    def feed(self, its: float) -> str | None:
        """Record one step's it/s; returns the warning the first time the collapse is sustained."""
        if its <= 0:
            return None
        if len(self._history) < self.warmup_steps:
            self._history.append(its)
            return None
        median = statistics.median(self._history[-self.window:])
        if its < self.ratio * median:
            self._slow_run += 1
        else:
            self._slow_run = 0
            self._history.append(its)
        if self._slow_run >= self.sustain and not self.warned:
            self.warned = True
            return (f"Training slowed to {its:.2f} it/s from a median of {median:.2f} it/s: the GPU memory is "
                    "probably full and spilling into shared system memory (Windows does this instead of failing)."
                    " Lower 'train_batch_size' or 'resolution', turn on 'gradient_checkpointing', or choose the"
                    " preset for your VRAM; on NVIDIA you can also set 'CUDA - Sysmem Fallback Policy' to"
                    " 'Prefer No Sysmem Fallback'.")
        return None
