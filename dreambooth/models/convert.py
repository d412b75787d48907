"""Key conversion between diffusers models and the original single-file (ldm/sgm) layout.

The name tables live with the model families (dreambooth/families/tables.py; each family says which
tables and key prefixes it uses); the functions here apply them to state dicts. No tensor values change
except where the layouts store them differently (VAE attention: linear vs 1x1 conv; OpenCLIP: fused
q/k/v and a transposed text projection), and those changes are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..families import all_families
from ..families.base import TextEncoder
from ..families.tables import (
    HF_LAYER_PREFIX,
    OPEN_CLIP_LAYER,
    OPEN_CLIP_PROJECTION,
    OPEN_CLIP_TOP,
    QKV,
    VAE_PREFIX,
    BlockTable,
    convert_by_table,
    open_clip_layer_key,
)

# Every registered family's CLIP-L key prefix (transformers names below it).
CLIP_L_PREFIXES = tuple(dict.fromkeys(encoder.ldm_prefix for family in all_families()
                                      for encoder in family.text_encoders if encoder.layout == "clip_l"))

# T5's encoder embedding is the shared one (tied): files store it once, as `shared.weight`.
T5_TIED_EMBEDDING = "encoder.embed_tokens.weight"

# --- UNet and VAE ---------------------------------------------------------------------------------------


def _is_vae_attention_weight(ldm_key: str) -> bool:
    return ".attn_1." in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], table: BlockTable) -> dict[str, torch.Tensor]:
    converted = convert_by_table(state_dict, table, VAE_PREFIX, "VAE")
    # The original VAE attention uses 1x1 convolutions where diffusers uses linear layers.
    return {key: value.reshape(*value.shape, 1, 1) if _is_vae_attention_weight(key) and value.dim() == 2 else value
            for key, value in converted.items()}


# --- text encoders -----------------------------------------------------------------------------------

def with_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise both transformers key layouts to `text_model.*` (transformers 5 drops the prefix)."""
    return {key if key.startswith(("text_model.", "text_projection")) else "text_model." + key: value
            for key, value in state_dict.items()}


def clip_l_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L text encoder: the original keeps transformers' names under a prefix.

    `position_ids` is a buffer, not a weight; it is left to the extras copied from the base file.
    """
    return {prefix + key: value for key, value in with_text_model_prefix(state_dict).items()
            if not key.endswith("position_ids")}


def _is_qkv(key: str) -> bool:
    return key.startswith(HF_LAYER_PREFIX) and ".self_attn." in key and key.split(".")[-2] in QKV


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text encoder (SD2, SDXL's second): renamed layers, fused q/k/v, transposed projection."""
    source = with_text_model_prefix(state_dict)
    converted: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        layer_key = open_clip_layer_key(key)
        if key in OPEN_CLIP_TOP:
            converted[prefix + OPEN_CLIP_TOP[key]] = value
        elif key == OPEN_CLIP_PROJECTION[0]:
            converted[prefix + OPEN_CLIP_PROJECTION[1]] = value.t().contiguous()
        elif layer_key is not None:
            converted[prefix + layer_key] = value
        elif not _is_qkv(key) and not key.endswith("position_ids"):
            raise ValueError(f"Text encoder weight {key!r} has no place in the OpenCLIP layout")
    converted.update(_fused_qkv(source, prefix))
    return converted


def _fused_qkv(source: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    fused = {}
    layers = sorted({int(key.split(".")[3]) for key in source if key.startswith(HF_LAYER_PREFIX)})
    for layer in layers:
        base = f"{HF_LAYER_PREFIX}{layer}.self_attn."
        for kind in ("weight", "bias"):
            parts = [source[f"{base}{name}.{kind}"] for name in QKV]
            fused[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return fused


def t5_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """T5 keeps transformers' names under a prefix. Its tied input embedding is written under both names, as
    separate tensors (a file holds no shared memory): A1111 reads `encoder.embed_tokens`, diffusers `shared`."""
    converted = {prefix + key: value for key, value in state_dict.items()}
    if "shared.weight" in state_dict:
        converted[prefix + "encoder.embed_tokens.weight"] = state_dict["shared.weight"].clone()
    return converted


def text_encoder_to_ldm(encoder: TextEncoder, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One text encoder's weights under its family's original keys."""
    if encoder.layout == "t5":
        return t5_to_ldm(state_dict, encoder.ldm_prefix)
    if encoder.layout == "clip_l":
        converted = clip_l_to_ldm(state_dict, encoder.ldm_prefix)
        if encoder.identity_projection:  # the diffusers model's stand-in, not part of the original file
            converted.pop(encoder.ldm_prefix + OPEN_CLIP_PROJECTION[0], None)
        return converted
    return open_clip_to_ldm(state_dict, encoder.ldm_prefix)


def normalise_clip_l_keys(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give CLIP-L keys written without `text_model.` (transformers 5 layout) the prefix A1111 expects."""
    normalised = {}
    for key, value in checkpoint.items():
        prefix = next((p for p in CLIP_L_PREFIXES if key.startswith(p)), None)
        if prefix and not key.startswith((prefix + "text_model.", prefix + "text_projection")):
            key = prefix + "text_model." + key[len(prefix):]
        normalised[key] = value
    return normalised


# --- original -> diffusers (text encoders; UNet and VAE are read by diffusers' own loader) ----------------

def ldm_to_clip_l(checkpoint: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The CLIP-L weights under `prefix`, in the `text_model.*` layout, without the position_ids buffer."""
    selected = {key[len(prefix):]: value for key, value in checkpoint.items()
                if key.startswith(prefix) and not key.endswith("position_ids")}
    return with_text_model_prefix(selected)


OPEN_CLIP_TO_HF_LAYER = {original: hf for hf, original in OPEN_CLIP_LAYER.items()}


def _hf_layer_weights(layer: str, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One OpenCLIP resblock weight as transformers weights (the fused in_proj split into q/k/v)."""
    base = f"{HF_LAYER_PREFIX}{layer}."
    module, _, leaf = name.rpartition(".")
    if leaf.startswith("in_proj_"):
        kind = leaf[len("in_proj_"):]
        return {f"{base}self_attn.{proj}.{kind}": part for proj, part in zip(QKV, value.chunk(3, dim=0), strict=True)}
    return {f"{base}{OPEN_CLIP_TO_HF_LAYER.get(module, module)}.{leaf}": value}


def ldm_to_open_clip(checkpoint: Mapping[str, torch.Tensor], prefix: str, layers: int,
                     with_projection: bool) -> dict[str, torch.Tensor]:
    """The first `layers` OpenCLIP layers under `prefix` as transformers CLIP weights (`text_model.*`)."""
    top = {original: name for name, original in OPEN_CLIP_TOP.items()}
    converted: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in top:
            converted[top[rest]] = value
        elif rest == OPEN_CLIP_PROJECTION[1] and with_projection:
            converted[OPEN_CLIP_PROJECTION[0]] = value.t().contiguous()
        elif rest.startswith("transformer.resblocks.") and int(rest.split(".")[2]) < layers:
            layer, name = rest[len("transformer.resblocks."):].split(".", 1)
            converted.update(_hf_layer_weights(layer, name, value))
    return converted


def ldm_to_t5(checkpoint: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """T5's weights under `prefix`; the tied input embedding under both its names (transformers 4 lists it once,
    as `shared`, transformers 5 twice), whichever of them the file used."""
    selected = {key[len(prefix):]: value for key, value in checkpoint.items() if key.startswith(prefix)}
    embedding = selected.get("shared.weight", selected.get("encoder.embed_tokens.weight"))
    if embedding is not None:
        selected["shared.weight"] = selected["encoder.embed_tokens.weight"] = embedding
    return selected


def text_encoder_from_ldm(encoder: TextEncoder, checkpoint: Mapping[str, torch.Tensor],
                          layers: int) -> dict[str, torch.Tensor]:
    """One text encoder's transformers weights from a single file (the first `layers` OpenCLIP layers)."""
    if encoder.layout == "t5":
        return ldm_to_t5(checkpoint, encoder.ldm_prefix)
    if encoder.layout == "clip_l":
        return ldm_to_clip_l(checkpoint, encoder.ldm_prefix)
    return ldm_to_open_clip(checkpoint, encoder.ldm_prefix, layers, encoder.with_projection)


def match_model_keys(state_dict: Mapping[str, torch.Tensor], model_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Adapt `text_model.*` keys to the key layout of the installed transformers' model."""
    known = set(model_keys)
    return {key if key in known or not key.startswith("text_model.") else key[len("text_model."):]: value
            for key, value in state_dict.items()}
