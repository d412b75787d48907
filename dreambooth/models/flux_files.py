"""Reading Flux.1 weights from the files Forge and ComfyUI users keep, offline.

What people have:

* one transformer file (`flux1-dev.safetensors`, keys `double_blocks.*` with or without `model.diffusion_model.`),
  in bf16/fp16, fp8 (e4m3fn or e5m2 storage, ComfyUI's "scaled fp8" with a `scale_weight` per layer), or NF4/FP4
  as Forge writes it (bitsandbytes' packed 4-bit weight plus its quantization state under `<weight>.absmax`,
  `.quant_map`, `.nested_absmax`, `.nested_quant_map` and `.quant_state.bitsandbytes__nf4`);
* beside it `clip_l`, `t5xxl` and `ae` files in the host's `models/text_encoder` and `models/VAE` folders;
* or one all-in-one file: transformer under `model.diffusion_model.`, VAE under `vae.`, the text encoders under
  `text_encoders.clip_l.transformer.` and `text_encoders.t5xxl.transformer.` (the layout Forge splits by);
* or a diffusers folder (read by the generic folder loader).

Everything is brought to full-precision-capable dtypes (bf16 where the file is quantized) and to diffusers /
transformers names; the released-width transformer goes through diffusers' own single-file converter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..families import flux_names

log = logging.getLogger(__name__)

ROLES = ("transformer", "vae", "clip_l", "t5xxl")
ROLE_NAMES = {"transformer": "Flux transformer", "vae": "Flux VAE (ae)", "clip_l": "CLIP-L text encoder",
              "t5xxl": "T5-XXL text encoder"}
# Key prefixes of each part inside an all-in-one file (Forge's and ComfyUI's layout).
ROLE_PREFIXES = {"transformer": ("model.diffusion_model.",), "vae": ("vae.", "first_stage_model."),
                 "clip_l": ("text_encoders.clip_l.transformer.", "text_encoders.clip_l."),
                 "t5xxl": ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.")}
# A key only that part has, in a file holding the part alone (no prefix).
ROLE_MARKERS = {"transformer": flux_names.FLUX_MARKERS,
                "vae": ("decoder.conv_in.weight",),
                "clip_l": ("text_model.encoder.layers.0.layer_norm1.bias", "encoder.layers.0.layer_norm1.bias"),
                "t5xxl": ("encoder.block.0.layer.0.SelfAttention.k.weight",)}
QUANT_STATE_TAGS = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
COMPANION_FOLDERS = ("text_encoder", "VAE", "clip", "vae")  # under the host's models folder
RELEASED_CONFIG = Path(__file__).resolve().parent.parent / "resources" / "configs" / "flux-dev" / "transformer"


# --- quantized storage ------------------------------------------------------------------------------------

def quantized_weights(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of 4-bit packed weights (each has a bitsandbytes quantization state beside it)."""
    return [key[: -len(tag)] for key in tensors for tag in QUANT_STATE_TAGS if key.endswith(tag)]


def _bitsandbytes(source: str) -> Any:
    try:
        import bitsandbytes.functional as functional
    except Exception as error:  # not installed, or built for another platform
        raise ModelError(f"{source} stores weights in 4 bits (NF4/FP4, bitsandbytes) and reading them needs the "
                         f"bitsandbytes package, which cannot be imported here ({error}); install it "
                         "(pip install bitsandbytes) or use a bf16 or fp8 version of the file.") from None
    return functional


def dequantize_4bit(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`tensors` with every bitsandbytes 4-bit weight unpacked (to its recorded dtype, bf16 in Forge's files)."""
    weights = quantized_weights(tensors)
    if not weights:
        return tensors
    functional = _bitsandbytes(source)
    result = dict(tensors)
    for weight in weights:
        state_keys = [key for key in tensors if key.startswith(weight + ".") and key != weight]
        state = {key[len(weight) + 1:]: result.pop(key) for key in state_keys}
        quant_state = functional.QuantState.from_dict(state, device=torch.device("cpu"))
        result[weight] = functional.dequantize_4bit(result[weight], quant_state)
    return result


def upcast_fp8(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """fp8-stored weights in `dtype`; ComfyUI's scaled fp8 (`<layer>.scale_weight`) multiplied back in."""
    result = {}
    for key, value in tensors.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        if value.dtype in FP8_DTYPES:
            value = value.to(dtype)
            scale = tensors.get(key.removesuffix("weight") + "scale_weight")
            if scale is not None:
                value = value * scale.to(dtype)
        result[key] = value
    return result


def full_precision(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    return upcast_fp8(dequantize_4bit(tensors, source))


def plain_fp8(tensors: Mapping[str, torch.Tensor]) -> bool:
    """fp8-stored weights without ComfyUI's scales: usable as stored (a cast is all a reader needs)."""
    scaled = any(key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")) for key in tensors)
    return not scaled and any(value.dtype in FP8_DTYPES for value in tensors.values())


# --- parts of a file ----------------------------------------------------------------------------------------

def _role_of_bare(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    return next((role for role, markers in ROLE_MARKERS.items() if any(m in keys for m in markers)), None)


def split_roles(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """The Flux parts a file holds, each under its own names (the all-in-one prefixes taken off)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    bare: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        role, prefix = _prefix_of(key)
        if role is None:
            bare[key] = value
        else:
            parts.setdefault(role, {})[key[len(prefix):]] = value
    if bare:
        role = _role_of_bare(bare)
        if role is None:
            raise ModelError(f"{source} holds no Flux part this tool knows (no transformer, VAE, CLIP-L or T5-XXL "
                             f"weights; first key {next(iter(bare))!r}).")
        parts.setdefault(role, {}).update(bare)
    return parts


def _prefix_of(key: str) -> tuple[str | None, str]:
    for role, prefixes in ROLE_PREFIXES.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                return role, prefix
    return None, ""


# --- the transformer ----------------------------------------------------------------------------------------

def released_transformer_config() -> dict[str, Any]:
    return json.loads((RELEASED_CONFIG / "config.json").read_text())


def transformer_from_original(state: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The diffusers weights of an original-layout transformer state dict.

    The released width goes through diffusers' single-file converter (it assumes that width); other widths,
    such as the tiny test models, through the same name table the exporter writes with."""
    if flux_names.inner_dim(config) == flux_names.RELEASED_INNER_DIM:
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

        return convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    return flux_names.from_original(state, config)


def transformer_weights(state: dict[str, torch.Tensor], config: Mapping[str, Any] | None = None
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, diffusers weights) from either layout of a transformer file; `config` when the file brought
    one (our tiny demo files), else the released config with the shapes the weights have."""
    layout = "original" if "double_blocks.0.img_attn.norm.key_norm.scale" in state else "diffusers"
    config = dict(config) if config else flux_names.config_from_weights(state, released_transformer_config(), layout)
    return config, transformer_from_original(state, config) if layout == "original" else state


# --- companion files ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FluxFiles:
    """Which file provides each part (several parts may come from one all-in-one file)."""

    parts: Mapping[str, Path]

    def missing(self) -> list[str]:
        return [role for role in ROLES if role not in self.parts]


def file_roles(path: Path) -> set[str]:
    """The parts a safetensors file holds, read from its header only (no weights loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not a candidate
        return set()
    roles = {role for role in ROLES if any(key.startswith(p) for key in keys for p in ROLE_PREFIXES[role])}
    bare = [key for key in keys if _prefix_of(key)[0] is None]
    role = _role_of_bare(bare) if bare else None
    roles |= {role} if role else set()
    if not any(key.endswith(marker) for key in keys for marker in ROLE_MARKERS["transformer"]):
        roles.discard("transformer")  # an SD checkpoint's UNet shares the `model.diffusion_model.` prefix
    return roles


def companion_folders(source: Path, models_dir: Path | None) -> list[Path]:
    """Where the text encoders and VAE of a transformer-only file are looked for: the file's own folder, then
    the host's `models/text_encoder`, `models/VAE` (and ComfyUI's `clip`, `vae`)."""
    folders = [source.parent]
    if models_dir is not None:
        folders += [models_dir / name for name in COMPANION_FOLDERS]
    seen: list[Path] = []
    for folder in folders:
        if folder.is_dir() and folder.resolve() not in [s.resolve() for s in seen]:
            seen.append(folder)
    return seen


def _preference(path: Path) -> tuple[bool, str]:
    """Full-precision files before fp8 ones, then by name: the choice is the same on every run."""
    return ("fp8" in path.name.lower(), path.name)


def find_flux_files(source: Path, models_dir: Path | None = None,
                    chosen: Mapping[str, Path] | None = None) -> FluxFiles:
    """The file of each part: `source` for what it holds, `chosen` for what the user named, else a file in the
    companion folders. A ModelError names each part still missing and where it was looked for."""
    parts: dict[str, Path] = dict.fromkeys(file_roles(source), source)
    parts.update({role: Path(path) for role, path in (chosen or {}).items()})
    wanted = [role for role in ROLES if role not in parts]
    folders = companion_folders(source, models_dir)
    if wanted:
        candidates = sorted((p for folder in folders for p in folder.glob("*.safetensors") if p != source),
                            key=_preference)
        for path in candidates:
            for role in file_roles(path) & set(wanted):
                parts[role] = path
                wanted.remove(role)
                log.info("Flux %s: using %s", ROLE_NAMES[role], path)
    if wanted:
        names = ", ".join(ROLE_NAMES[role] for role in wanted)
        where = ", ".join(str(folder) for folder in folders) or str(source.parent)
        raise ModelError(f"{source} is a Flux model without its {names}; put the file(s) (e.g. clip_l.safetensors, "
                         f"t5xxl_fp16.safetensors, ae.safetensors) into one of: {where}.")
    return FluxFiles(parts)
