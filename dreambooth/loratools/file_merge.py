"""Merge LoRAs into a single-file checkpoint in its own (original) layout, one tensor at a time: SD3 / SD 3.5 and
Flux.1.

Their LoRA files (kohya spelling) name the original layout's modules: `lora_unet_` + a transformer weight's path
with '_' (`lora_unet_joint_blocks_0_x_block_attn_qkv` is `model.diffusion_model.joint_blocks.0.x_block.attn.qkv
.weight`; Forge's transformer-only Flux files carry no prefix), `lora_te1_`/`lora_te2_` + a text encoder's
transformers path under `text_encoders.<clip_l|clip_g|…>.transformer.`. A1111, Forge and ComfyUI build the same
map from the loaded model's keys, so the merge works on the file itself: each weight a LoRA names gets
strength * change added in fp32 and rounded once; every other tensor is copied. The output is written as it is
read (a safetensors header, then each tensor's bytes), so neither the model (Flux dev: 24 GB in bf16) nor an fp32
copy of it is ever held in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import ModelError
from ..families import all_families, get_family
from ..families.base import ModelFamily
from ..models.export import PRECISIONS
from .merge import Weighted, host_change
from .read import LoraFile, LoraModule, guess_family

DENOISER_PREFIX = "model.diffusion_model."
# safetensors' dtype names: the floats a LoRA is merged into (and the output precision applies to), and the size
# of every element type a checkpoint may hold (fp8 and 4-bit packs are copied as they are).
PLAIN_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
SAFETENSORS_NAMES = {dtype: name for name, dtype in PLAIN_FLOATS.items()}
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# Metadata that describes the source's bytes, wrong for the merged file.
STALE_METADATA = ("modelspec.hash_sha256",)


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a safetensors file, from its header: key, safetensors dtype name, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ITEM_BYTES[self.dtype] * math.prod(self.shape)


Changes = dict[str, list[tuple[LoraModule, float]]]  # file key -> the LoRA layers (and strengths) landing on it


# --- reading headers and families ---------------------------------------------------------------------------

def read_header(path: Path) -> tuple[list[FileTensor], dict[str, str]]:
    """The tensors (in the file's order) and metadata of a .safetensors file, without reading any weight."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = [FileTensor(key, handle.get_slice(key).get_dtype(), tuple(handle.get_slice(key).get_shape()))
                       for key in handle.keys()]  # noqa: SIM118 - not a dict
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ModelError(f"{path} cannot be read ({error}); the file is damaged or incomplete - copy it again.") from None
    return tensors, metadata


def _check_known(tensors: Sequence[FileTensor], source: Path) -> None:
    unknown = next((tensor for tensor in tensors if tensor.dtype not in ITEM_BYTES), None)
    if unknown is not None:
        raise ModelError(f"{source.name}: tensor {unknown.key} has the storage type {unknown.dtype}, which this tool "
                         "cannot copy; merge into the bf16/fp16 version of the file.")


def file_family(keys: Iterable[str]) -> str | None:
    """The family merged in the file's own layout (SD3, Flux dev/schnell) whose weights a file holds, else None."""
    keys = list(keys)
    found = [family for family in all_families() if family.denoiser_folder != "unet" and family.matches_keys(keys)]
    return found[0].name if found else None


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
        families.append(file_family(tensor.key for tensor in read_header(checkpoint)[0]))
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
    if tensor.dtype not in PLAIN_FLOATS:
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
    return SAFETENSORS_NAMES[dtype] if tensor.dtype in PLAIN_FLOATS else tensor.dtype


def merged_tensor(key: str, value: torch.Tensor, layers: list[tuple[LoraModule, float]],
                  dtype: torch.dtype) -> torch.Tensor:
    """The file's tensor with its layers' changes added in fp32, rounded once to `dtype` (floats only)."""
    if value.dtype not in SAFETENSORS_NAMES:
        return value
    result = value
    if layers:
        result = value.float()
        for module, strength in layers:
            result = result + host_change(module, value, strength)
    converted = result.to(dtype)
    if dtype == torch.float16 and torch.isinf(converted).any() and not torch.isinf(result).any():
        raise ModelError(f"{key} exceeds fp16's range; choose bf16 or fp32 as the precision.")
    return converted


def write_streamed(target: Path, tensors: Sequence[FileTensor], produce: Callable[[str], torch.Tensor],
                   metadata: Mapping[str, str]) -> None:
    """A safetensors file written atomically as its tensors are produced, one at a time (the header first: every
    tensor's type and shape are known before its bytes are). safetensors' own writer needs all tensors at once."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for tensor in tensors:
        header[tensor.key] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                              "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format's 8-byte alignment of the data
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for tensor in tensors:
            data = produce(tensor.key).contiguous().reshape(-1).view(torch.uint8)
            if data.numel() != tensor.nbytes:
                raise ModelError(f"{tensor.key}: {data.numel()} bytes produced, {tensor.nbytes} announced.")
            out.write(memoryview(data.numpy()))


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


def merge_into_file(source: Path, loras: Weighted, target: Path, precision: str,
                    metadata: Mapping[str, str]) -> int:
    """Write `source` with the LoRAs merged at their weights to `target` in `precision` (floating tensors; see
    output_dtype), with the source's metadata plus `metadata`; returns the number of weights changed."""
    from safetensors import safe_open

    tensors, own_metadata = read_header(source)
    _check_known(tensors, source)
    unit = _check_families(file_family(tensor.key for tensor in tensors), loras, source)
    changes = plan_changes(tensors, loras, unit, source)
    dtype = PRECISIONS[precision]
    written = [FileTensor(tensor.key, output_dtype(tensor, dtype), tensor.shape) for tensor in tensors]
    kept = {key: value for key, value in own_metadata.items() if key not in STALE_METADATA}
    with safe_open(str(source), framework="pt", device="cpu") as handle:
        def produce(key: str) -> torch.Tensor:
            return merged_tensor(key, handle.get_tensor(key), changes.get(key, []), dtype)

        with torch.no_grad():
            write_streamed(target, written, produce, {**kept, **metadata})
    return len(changes)
