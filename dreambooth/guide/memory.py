"""Estimate of the device memory a training config needs, and a monitor for collapsing it/s.

The estimate adds up weights, gradients, optimizer state, activations and a fixed runtime overhead
from the parameter counts of the real architectures (each family unit counts them from the configs it
ships, on meta tensors) and per-dtype / per-optimizer byte factors.  It is a planning aid (within
roughly +-30 % of what the trainer peaks at), not a measurement.  What the trainer keeps on the device
is counted as it does it: the denoiser and the VAE stay there for the whole run, frozen weights in the
compute dtype; the text encoders leave it once their outputs are cached (train/textcache.py: every
caption is encoded before the first step) and come back only while previews render; latent caching saves
the VAE's work and activations, not its weights.
"""

from __future__ import annotations

import statistics
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import TrainingConfig, caches_text_outputs
from ..families import ModelFamily, get_family

GIB = 1024 ** 3
MEMORY_CLASSES_GB = (6, 8, 12, 16, 24, 48)
# Bytes per weight of a quantized frozen base ('base_quantization'): NF4 packs two weights per byte plus an fp8
# scale per 64 weights and an fp32 scale per 256 of those (double quantization); int8 keeps an fp32 scale per
# row; fp8 one byte. "none": the compute dtype's.
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0 + 4 / 3072, "fp8": 1.0}
FIT_MARGIN = 0.9  # leave 10 % of a card for fragmentation and the samples rendered during training

# Encoding the batch's pixels with the VAE each step (latents not cached): a rough allowance for its
# activations, which are freed before the denoiser runs (no gradients flow through the VAE).
VAE_ENCODE_FRACTION = 0.1
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

    def fitting_classes(self) -> list[int]:
        """The memory classes (GB) whose cards hold this run with the presets' safety margin."""
        return [size for size in MEMORY_CLASSES_GB if self.total <= size * GIB * FIT_MARGIN]

    def lines(self) -> list[str]:
        rows = [f"{name:<16} {value / GIB:6.2f} GiB" for name, value in self.parts().items()]
        fitting = self.fitting_classes()
        fits = f"{fitting[0]} GB and larger" if fitting else f"none up to {MEMORY_CLASSES_GB[-1]} GB"
        return rows + [f"{'total':<16} {self.total / GIB:6.2f} GiB", f"{'fits':<16} {fits}"]


def safetensors_params(path: Path) -> int:
    """Parameters in a .safetensors file, from its header alone (no tensor is read)."""
    import json

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
    """Parameter counts per component folder of the diffusers model in `folder` (a model's working/; sharded
    weights are summed), or None when it has none readable (then the estimate uses the real architecture's)."""
    if folder is None or not Path(folder).is_dir():
        return None
    counts = {}
    try:
        for part in sorted(Path(folder).iterdir()):
            files = sorted(part.glob("*.safetensors")) if part.is_dir() else []
            if files:
                counts[part.name] = sum(safetensors_params(file) for file in files)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return counts or None


def lora_params_per_rank(family: str, text_encoder: bool, denoiser: bool = True) -> int:
    """LoRA parameters per unit of rank of the real model: the sum of (in + out) over the adapted layers."""
    unit = get_family(family)
    per_part = unit.lora_parameters_per_rank()
    count = per_part[unit.denoiser_folder] if denoiser else 0
    if text_encoder:
        count += sum(per_part[encoder.folder] for encoder in unit.text_encoders)
    return count


def _text_encoder_params(unit: ModelFamily, params: Mapping[str, int]) -> int:
    return sum(params.get(encoder.folder, 0) for encoder in unit.text_encoders)


def _scale(unit: ModelFamily, params: Mapping[str, int]) -> float:
    """How the model compares with the real architecture (1.0 for it; tiny test models are far smaller)."""
    return params[unit.denoiser_folder] / unit.parameter_counts()[unit.denoiser_folder]


def _trainable_params(config: TrainingConfig, unit: ModelFamily, params: Mapping[str, int]) -> int:
    train_te = config.train_text_encoder
    if config.method == "lora":
        per_rank = lora_params_per_rank(unit.name, train_te, config.train_unet) * _scale(unit, params)
        return int(config.lora_rank * per_rank * (2 if config.use_dora else 1))
    trainable = params[unit.denoiser_folder] if config.train_unet else 0
    return trainable + (_text_encoder_params(unit, params) if train_te else 0)


def _frozen_on_device(config: TrainingConfig, unit: ModelFamily, params: Mapping[str, int]) -> tuple[float, int]:
    """(bytes of the weights held on the device without being trained, VAE parameters).

    Frozen text encoders count unless their outputs are cached (then they wait on the CPU); a LoRA's frozen
    denoiser on a quantized base counts in its storage ('base_quantization'); the VAE stays on the device,
    fp32 under fp16 (it overflows)."""
    compute = COMPUTE_BYTES[config.mixed_precision]
    frozen = 0.0
    if config.method == "lora" or not config.train_unet:
        quantized = config.method == "lora" and config.base_quantization != "none"
        frozen += params[unit.denoiser_folder] * (QUANTIZED_BYTES[config.base_quantization] if quantized else compute)
    frozen_text = config.method == "lora" or not config.train_text_encoder
    if frozen_text and not caches_text_outputs(config):
        frozen += _text_encoder_params(unit, params) * compute
    return frozen, params.get("vae", 0)


def _activations(config: TrainingConfig, unit: ModelFamily, checkpointing: bool, scale: float = 1.0) -> int:
    area = (config.resolution / unit.resolution) ** 2
    per_sample = unit.activation_gib * GIB * area * scale
    if config.train_text_encoder:
        per_sample *= 1 + TEXT_ENCODER_ACTIVATION_FRACTION
    if config.cache_latents == "off":
        per_sample *= 1 + VAE_ENCODE_FRACTION
    precision = COMPUTE_BYTES[config.mixed_precision] / 2
    factor = (unit.checkpointing_factor or CHECKPOINTING_FACTOR) if checkpointing else 1.0
    return int(per_sample * config.train_batch_size * precision * factor)


def estimate_memory(config: TrainingConfig, family: str | None = None,
                    params: Mapping[str, int] | None = None) -> MemoryEstimate:
    """Bytes the config needs on one device (defaults to the config's model family).

    `params` are the parameter counts of the model really trained, by component folder (see
    `model_params`); without them the real architecture's are used. Activations scale with the
    denoiser's size relative to the real one.
    """
    unit = get_family(family or config.model_family)
    params = params if params and params.get(unit.denoiser_folder) else unit.parameter_counts()
    scale = _scale(unit, params)
    trainable = _trainable_params(config, unit, params)
    frozen, vae = _frozen_on_device(config, unit, params)
    compute = COMPUTE_BYTES[config.mixed_precision]
    ema = trainable * MASTER_BYTES if config.use_ema else 0
    vae_bytes = vae * (4 if config.mixed_precision == "fp16" else compute)
    weights = int(trainable * MASTER_BYTES + frozen + vae_bytes + ema)
    state = int(trainable * OPTIMIZER_STATE_BYTES.get(config.optimizer, 8.0))
    checkpointing = config.gradient_checkpointing
    return MemoryEstimate(weights=weights, gradients=trainable * MASTER_BYTES, optimizer=state,
                          activations=_activations(config, unit, checkpointing, scale), overhead=RUNTIME_OVERHEAD,
                          activations_other_checkpointing=_activations(config, unit, not checkpointing, scale),
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
