"""Key conversion between diffusers models and the original single-file (ldm/sgm) layout.

Tables map module prefixes; small pure functions apply them key by key. The block numbering of
the original UNet is derived from the config (levels and layers per block), so the same code
serves the full-size models and the tiny test models. No tensor values change except where the
layouts store them differently (VAE attention: linear vs 1x1 conv; OpenCLIP: fused q/k/v and a
transposed text projection), and those changes are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}

# --- UNet ---------------------------------------------------------------------------------------------

UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
               "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
# A prefix entry: diffusers prefix -> (ldm prefix, table for the rest of the key or None).
PrefixTable = dict[str, tuple[str, "dict[str, str] | None"]]


def _unet_down_prefixes(levels: int, layers: int) -> PrefixTable:
    table: PrefixTable = {}
    for level in range(levels):
        for layer in range(layers):
            block = 1 + level * (layers + 1) + layer
            table[f"down_blocks.{level}.resnets.{layer}."] = (f"input_blocks.{block}.0.", UNET_RESNET)
            table[f"down_blocks.{level}.attentions.{layer}."] = (f"input_blocks.{block}.1.", None)
        if level < levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{(level + 1) * (layers + 1)}.0.op.",
                                                                 None)
    return table


def _unet_up_prefixes(up_block_types: list[str], layers: int) -> PrefixTable:
    table: PrefixTable = {}
    for level, block_type in enumerate(up_block_types):
        for layer in range(layers + 1):
            block = level * (layers + 1) + layer
            table[f"up_blocks.{level}.resnets.{layer}."] = (f"output_blocks.{block}.0.", UNET_RESNET)
            table[f"up_blocks.{level}.attentions.{layer}."] = (f"output_blocks.{block}.1.", None)
        if level < len(up_block_types) - 1:
            # The upsampler follows the resnet, and the attention block when the level has one.
            slot = 2 if "CrossAttn" in block_type else 1
            table[f"up_blocks.{level}.upsamplers.0."] = (f"output_blocks.{level * (layers + 1) + layers}.{slot}.",
                                                         None)
    return table


def unet_prefix_table(config: Mapping[str, Any]) -> PrefixTable:
    """diffusers UNet2DConditionModel prefixes -> original `model.diffusion_model.` prefixes."""
    layers = int(config["layers_per_block"])
    table: PrefixTable = {name: (UNET_PREFIX + ldm, None) for name, ldm in UNET_TOP.items()}
    down = _unet_down_prefixes(len(config["down_block_types"]), layers)
    up = _unet_up_prefixes(list(config["up_block_types"]), layers)
    mid = {"mid_block.attentions.0.": ("middle_block.1.", None),
           "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET),
           "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET)}
    for name, (ldm, inner) in {**down, **up, **mid}.items():
        table[name] = (UNET_PREFIX + ldm, inner)
    return table


# --- VAE ----------------------------------------------------------------------------------------------

VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out.",
                 # diffusers before 0.14 named them like this; accepted so old folders still convert
                 "query.": "q.", "key.": "k.", "value.": "v.", "proj_attn.": "proj_out."}


def vae_prefix_table(config: Mapping[str, Any]) -> PrefixTable:
    """diffusers AutoencoderKL prefixes -> original `first_stage_model.` prefixes."""
    levels, layers = len(config["block_out_channels"]), int(config["layers_per_block"])
    table: PrefixTable = {}
    for coder in ("encoder", "decoder"):
        table[f"{coder}.mid_block.attentions.0."] = (f"{coder}.mid.attn_1.", VAE_ATTENTION)
        table[f"{coder}.mid_block.resnets.0."] = (f"{coder}.mid.block_1.", VAE_RESNET)
        table[f"{coder}.mid_block.resnets.1."] = (f"{coder}.mid.block_2.", VAE_RESNET)
        table[f"{coder}.conv_norm_out."] = (f"{coder}.norm_out.", None)
        for name in ("conv_in.", "conv_out."):
            table[f"{coder}.{name}"] = (f"{coder}.{name}", None)
    for level in range(levels):
        for layer in range(layers):
            table[f"encoder.down_blocks.{level}.resnets.{layer}."] = (f"encoder.down.{level}.block.{layer}.", VAE_RESNET)
        table[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (f"encoder.down.{level}.downsample.conv.", None)
        # The decoder's up blocks are stored in reverse order in the original layout.
        original = levels - 1 - level
        for layer in range(layers + 1):
            table[f"decoder.up_blocks.{level}.resnets.{layer}."] = (f"decoder.up.{original}.block.{layer}.", VAE_RESNET)
        table[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = (f"decoder.up.{original}.upsample.conv.", None)
    for name in ("quant_conv.", "post_quant_conv."):
        table[name] = (name, None)
    return {name: (VAE_PREFIX + ldm, inner) for name, (ldm, inner) in table.items()}


def _is_vae_attention_weight(ldm_key: str) -> bool:
    return ".attn_1." in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


# --- applying prefix tables --------------------------------------------------------------------------

def _rename_rest(rest: str, inner: dict[str, str] | None) -> str:
    for old, new in (inner or {}).items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def rename_key(key: str, table: PrefixTable) -> str:
    """Rename one diffusers key by the longest matching prefix; KeyError when none matches."""
    for length in range(key.count("."), 0, -1):
        prefix = ".".join(key.split(".")[:length]) + "."
        if prefix in table:
            ldm_prefix, inner = table[prefix]
            return ldm_prefix + _rename_rest(key[len(prefix):], inner)
    raise KeyError(key)


def convert_by_table(state_dict: Mapping[str, torch.Tensor], table: PrefixTable, what: str) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state_dict.items():
        try:
            converted[rename_key(key, table)] = value
        except KeyError:
            raise ValueError(f"{what} weight {key!r} has no place in the original layout "
                             "(unsupported architecture)") from None
    return converted


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return convert_by_table(state_dict, unet_prefix_table(config), "UNet")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    converted = convert_by_table(state_dict, vae_prefix_table(config), "VAE")
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


OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                   "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
QKV = ("q_proj", "k_proj", "v_proj")


def _open_clip_layer_key(rest: str) -> str:
    layer, name = rest.split(".", 1)
    return f"transformer.resblocks.{layer}." + _rename_rest(name, OPEN_CLIP_LAYER)


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP text encoder (SD2, SDXL's second): renamed layers, fused q/k/v, transposed projection."""
    source = with_text_model_prefix(state_dict)
    converted: dict[str, torch.Tensor] = {}
    layer_prefix = "text_model.encoder.layers."
    for key, value in source.items():
        if key in OPEN_CLIP_TOP:
            converted[prefix + OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            converted[prefix + "text_projection"] = value.t().contiguous()
        elif key.startswith(layer_prefix) and ".self_attn." in key and key.split(".")[-2] in QKV:
            continue  # fused below
        elif key.startswith(layer_prefix):
            converted[prefix + _open_clip_layer_key(key[len(layer_prefix):])] = value
        elif not key.endswith("position_ids"):
            raise ValueError(f"Text encoder weight {key!r} has no place in the OpenCLIP layout")
    converted.update(_fused_qkv(source, prefix))
    return converted


def _fused_qkv(source: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    fused = {}
    layers = sorted({int(key.split(".")[3]) for key in source if key.startswith("text_model.encoder.layers.")})
    for layer in layers:
        base = f"text_model.encoder.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            parts = [source[f"{base}{name}.{kind}"] for name in QKV]
            fused[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return fused


def normalise_clip_l_keys(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give CLIP-L keys written without `text_model.` (transformers 5 layout) the prefix A1111 expects."""
    normalised = {}
    for key, value in checkpoint.items():
        prefix = next((p for p in CLIP_L_PREFIXES.values() if key.startswith(p)), None)
        if prefix and not key.startswith(prefix + "text_model."):
            key = prefix + "text_model." + key[len(prefix):]
        normalised[key] = value
    return normalised


# --- original -> diffusers (text encoders; UNet and VAE are read by diffusers' own loader) ----------------

def ldm_to_clip_l(checkpoint: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The CLIP-L weights under `prefix`, in the `text_model.*` layout, without the position_ids buffer."""
    selected = {key[len(prefix):]: value for key, value in checkpoint.items()
                if key.startswith(prefix) and not key.endswith("position_ids")}
    return with_text_model_prefix(selected)


def _split_qkv(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    base = key.replace("attn.in_proj_", "self_attn.").rsplit(".", 1)[0]
    kind = "weight" if key.endswith("weight") else "bias"
    return {f"{base}.{name}.{kind}": part for name, part in zip(QKV, value.chunk(3, dim=0), strict=True)}


def ldm_to_open_clip(checkpoint: Mapping[str, torch.Tensor], prefix: str, layers: int,
                     with_projection: bool) -> dict[str, torch.Tensor]:
    """The first `layers` OpenCLIP layers under `prefix` as transformers CLIP weights (`text_model.*`)."""
    top = {ldm: name for name, ldm in OPEN_CLIP_TOP.items()}
    inverse_layer = {new: old for old, new in OPEN_CLIP_LAYER.items()}
    converted: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in top:
            converted[top[rest]] = value
        elif rest == "text_projection" and with_projection:
            converted["text_projection.weight"] = value.t().contiguous()
        elif rest.startswith("transformer.resblocks.") and int(rest.split(".")[2]) < layers:
            layer, name = rest[len("transformer.resblocks."):].split(".", 1)
            target = f"text_model.encoder.layers.{layer}." + _rename_rest(name, inverse_layer)
            converted.update(_split_qkv(target, value) if "in_proj_" in name else {target: value})
    return converted


def match_model_keys(state_dict: Mapping[str, torch.Tensor], model_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Adapt `text_model.*` keys to the key layout of the installed transformers' model."""
    known = set(model_keys)
    return {key if key in known or not key.startswith("text_model.") else key[len("text_model."):]: value
            for key, value in state_dict.items()}
