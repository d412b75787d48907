"""Merge LoRAs into a single-file checkpoint in its own (original) layout, one tensor at a time: SD3 / SD 3.5 and
Flux.1.

Their LoRA files (kohya spelling) name the original layout's modules: `lora_unet_` + a transformer weight's path
with '_' (`lora_unet_joint_blocks_0_x_block_attn_qkv` is `model.diffusion_model.joint_blocks.0.x_block.attn.qkv
.weight`; Forge's transformer-only Flux files carry no prefix), `lora_te1_`/`lora_te2_` + a text encoder's
transformers path under `text_encoders.<clip_l|clip_g|…>.transformer.`. A1111, Forge and ComfyUI build the same
map from the loaded model's keys, so the merge works on the file itself: each weight a LoRA names gets
strength * change added in fp32 and rounded once; every other tensor is copied byte for byte (or rounded to the
output precision). The output is written as the source is read, one tensor at a time (`safetensors_stream`), so
neither the model (Flux dev: 24 GB in bf16) nor an fp32 copy of it is ever held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from ..atomic import free_bytes
from ..errors import ModelError
from ..families import get_family, transformer_family_of
from ..families.base import ModelFamily
from ..models.export import PRECISIONS
from .merge import Weighted, host_change
from .read import LoraFile, LoraModule, guess_family
from .safetensors_stream import (
    FLOAT_DTYPES,
    FileTensor,
    check_stored,
    copy_bytes,
    read_header,
    read_tensor,
    write_streamed,
    write_tensor,
)

DENOISER_PREFIX = "model.diffusion_model."
SAFETENSORS_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
# Metadata that describes the source's bytes, wrong for the merged file.
STALE_METADATA = ("modelspec.hash_sha256",)

Changes = dict[str, list[tuple[LoraModule, float]]]  # file key -> the LoRA layers (and strengths) landing on it


# --- families ---------------------------------------------------------------------------------------------------

def lora_family(path: Path) -> str | None:
    """The family a LoRA file was made for, from its header alone (None when it does not tell; the LoRA reader
    reports a file that is not .safetensors)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    tensors, metadata = read_header(path)
    return metadata.get("dreambooth_family") or guess_family(dict.fromkeys(t.key for t in tensors), metadata)


def merges_in_file(checkpoint: Path, loras: Sequence[Path]) -> bool:
    """Whether this merge is done on the file: the checkpoint or a LoRA is of a family merged that way."""
    families = [lora_family(path) for path in loras]
    if checkpoint.suffix.lower() == ".safetensors" and checkpoint.is_file():
        families.append(transformer_family_of(tensor.key for tensor in read_header(checkpoint)[0]))
    return any(name is not None and get_family(name).denoiser_folder != "unet" for name in families)


# --- where each LoRA layer lands ----------------------------------------------------------------------------

def denoiser_prefix(keys: Iterable[str]) -> str:
    """`model.diffusion_model.` for single files; none for a transformer-only file (Forge's Flux files)."""
    return DENOISER_PREFIX if any(key.startswith(DENOISER_PREFIX) for key in keys) else ""


def layer_names(keys: Sequence[str], family: ModelFamily) -> dict[str, str]:
    """kohya layer name -> the file's weight key, derived from the file's keys as the hosts derive it."""
    prefix = denoiser_prefix(keys)
    names: dict[str, str] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        module = key.removesuffix(".weight")
        encoder = next((spec for spec in family.text_encoders if module.startswith(spec.ldm_prefix)), None)
        if encoder is not None:
            names[f"{encoder.lora_prefix}_{module[len(encoder.ldm_prefix):].replace('.', '_')}"] = key
        elif module.startswith(prefix):
            names[f"lora_unet_{module[len(prefix):].replace('.', '_')}"] = key
    return names


def _missing_layer(lora: LoraFile, layer: str, source: Path) -> ModelError:
    if layer.startswith("lora_te"):
        return ModelError(f"{lora.name}: text-encoder layer {layer} names no weight of {source.name} (the file holds "
                          "no such text encoder, e.g. a transformer-only file); merge into a file with the text "
                          "encoders, or use a LoRA without text-encoder layers.")
    return ModelError(f"{lora.name}: layer {layer} names no weight of {source.name}; the LoRA was made for another "
                      "model or architecture.")


def _check_target(lora: LoraFile, layer: str, module: LoraModule, tensor: FileTensor, source: Path) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ModelError(f"{source.name}: {tensor.key} (LoRA layer {layer}) is stored quantized ({tensor.dtype}: "
                         "fp8, or NF4/FP4 packed in bytes); a LoRA merges into full weights only - merge into the "
                         "bf16/fp16 version of the file.")
    width = module.diff.numel() if module.diff is not None else module.up.shape[0] * math.prod(module.down.shape[1:])
    if width != math.prod(tensor.shape):
        raise ModelError(f"{lora.name}: layer {layer} does not fit {tensor.key} of {source.name} (shape "
                         f"{list(tensor.shape)}); the LoRA was made for another model or architecture.")


def plan_changes(tensors: Sequence[FileTensor], loras: Weighted, family: ModelFamily, source: Path) -> Changes:
    """Every LoRA layer's file key, checked (present, full precision, same size) before anything is written."""
    by_key = {tensor.key: tensor for tensor in tensors}
    names = layer_names(list(by_key), family)
    changes: Changes = {}
    for lora, strength in loras:
        for layer, module in lora.modules.items():
            key = names.get(layer)
            if key is None:
                raise _missing_layer(lora, layer, source)
            _check_target(lora, layer, module, by_key[key], source)
            changes.setdefault(key, []).append((module, strength))
    return changes


# --- the merged tensors ---------------------------------------------------------------------------------------

def output_dtype(tensor: FileTensor, dtype: torch.dtype) -> str:
    """Floating tensors take the output precision; fp8, integer and packed tensors keep their own type."""
    return SAFETENSORS_NAMES[dtype] if tensor.dtype in FLOAT_DTYPES else tensor.dtype


def merged_tensor(key: str, value: torch.Tensor, layers: list[tuple[LoraModule, float]],
                  dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor of the file with its layers' changes added in fp32, rounded once to `dtype`."""
    result = value
    if layers:
        result = value.float()
        for module, strength in layers:
            result = result + host_change(module, value, strength)
    converted = result.to(dtype)
    if dtype == torch.float16 and torch.isinf(converted).any() and not torch.isinf(result).any():
        raise ModelError(f"{key} exceeds fp16's range; choose bf16 or fp32 as the precision.")
    return converted


def _writer(handle: BinaryIO, tensors: Sequence[FileTensor], changes: Changes,
            dtype: torch.dtype) -> Callable[[int, BinaryIO], None]:
    """write_one for write_streamed: a tensor whose bytes stay (not changed, already in the output type) is copied
    as bytes; the others are read, merged and rounded."""
    def write_one(index: int, out: BinaryIO) -> None:
        tensor = tensors[index]
        layers = changes.get(tensor.key, [])
        if tensor.dtype not in FLOAT_DTYPES or (not layers and FLOAT_DTYPES[tensor.dtype] == dtype):
            copy_bytes(handle, tensor, out)
        else:
            write_tensor(out, merged_tensor(tensor.key, read_tensor(handle, tensor), layers, dtype))

    return write_one


# --- the job ----------------------------------------------------------------------------------------------------

def _check_families(checkpoint_family: str | None, loras: Weighted, source: Path) -> ModelFamily:
    if checkpoint_family is None:
        raise ModelError(f"{source.name} is not an SD3 / SD 3.5 or Flux.1 checkpoint, which the LoRA "
                         f"{loras[0][0].name} is for; choose a checkpoint of the LoRA's family.")
    unit = get_family(checkpoint_family)
    for lora, _ in loras:
        name = lora.metadata.get("dreambooth_family") or guess_family(dict.fromkeys(lora.modules), lora.metadata)
        if name is not None and get_family(name).lora_base_model_version != unit.lora_base_model_version:
            raise ModelError(f"{lora.name} is a {get_family(name).label} LoRA, but {source.name} is a {unit.label} "
                             "checkpoint; choose a checkpoint of the LoRA's family.")
    return unit


def _check_space(target: Path, needed: int) -> None:
    """Before minutes of writing (Flux dev: 24 GB in bf16), not at the end of them."""
    free = free_bytes(target.parent)
    if free is not None and free < needed:
        raise ModelError(f"The merged checkpoint needs {_size(needed)}, but {target.parent} has {_size(free)} free; "
                         "free space there or choose a smaller precision.")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def merge_into_file(source: Path, loras: Weighted, target: Path, precision: str,
                    metadata: Mapping[str, str]) -> int:
    """Write `source` with the LoRAs merged at their weights to `target` in `precision` (floating tensors; see
    output_dtype), with the source's metadata plus `metadata`; returns the number of weights changed."""
    tensors, own_metadata = read_header(source)
    check_stored(tensors, source)
    unit = _check_families(transformer_family_of(tensor.key for tensor in tensors), loras, source)
    changes = plan_changes(tensors, loras, unit, source)
    dtype = PRECISIONS[precision]
    written = [FileTensor(tensor.key, output_dtype(tensor, dtype), tensor.shape) for tensor in tensors]
    _check_space(target, sum(tensor.nbytes for tensor in written))
    kept = {key: value for key, value in own_metadata.items() if key not in STALE_METADATA}
    with open(source, "rb") as handle, torch.no_grad():
        write_streamed(target, written, _writer(handle, tensors, changes, dtype), {**kept, **metadata})
    return len(changes)
