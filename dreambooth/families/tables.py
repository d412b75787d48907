"""The name tables between diffusers modules and the original single-file (ldm/sgm) layout.

One copy serves both writers: the checkpoint converter (models/convert.py renames every weight key by
these tables) and the LoRA key writer and reader (train/lora_keys.py names every module by them). Names
here are module paths without a trailing dot; a weight key is its module path plus the leaf
(`weight`, `bias`), and renaming a key renames its module path by the longest matching prefix.

The UNet block numbering is derived from the config (levels, layers per block, which up blocks have
attention), so the same tables serve the full-size and the tiny test models. Nothing here imports
torch: the registry and the config schema import these modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."



@dataclass(frozen=True)
class Slot:
    """Where a diffusers weight (or layer) lives in an original layout that fuses layers diffusers keeps apart
    (Flux's q/k/v): rows `start:start+rows` of `original` (rows None: all of them)."""

    original: str
    start: int = 0
    rows: int | None = None
    swap_halves: bool = False  # the original stores the two halves in the other order (AdaLN shift/scale)


# A block entry: diffusers module prefix -> (original prefix, renames inside the block).
BlockTable = dict[str, tuple[str, Mapping[str, str]]]
NO_RENAMES: Mapping[str, str] = {}

# --- UNet ---------------------------------------------------------------------------------------------

UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_MID = {"mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
            "mid_block.attentions.0": ("middle_block.1", NO_RENAMES),
            "mid_block.resnets.1": ("middle_block.2", UNET_RESNET)}


def _unet_down_blocks(levels: int, layers: int) -> BlockTable:
    table: BlockTable = {}
    for level in range(levels):
        for layer in range(layers):
            block = 1 + level * (layers + 1) + layer
            table[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{block}.0", UNET_RESNET)
            table[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{block}.1", NO_RENAMES)
        if level < levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{(level + 1) * (layers + 1)}.0.op",
                                                                NO_RENAMES)
    return table


def _unet_up_blocks(up_block_types: list[str], layers: int) -> BlockTable:
    table: BlockTable = {}
    for level, block_type in enumerate(up_block_types):
        for layer in range(layers + 1):
            block = level * (layers + 1) + layer
            table[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{block}.0", UNET_RESNET)
            table[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{block}.1", NO_RENAMES)
        if level < len(up_block_types) - 1:
            # The upsampler follows the resnet, and the attention block when the level has one.
            slot = 2 if "CrossAttn" in block_type else 1
            table[f"up_blocks.{level}.upsamplers.0"] = (f"output_blocks.{level * (layers + 1) + layers}.{slot}",
                                                        NO_RENAMES)
    return table


def unet_table(config: Mapping[str, Any]) -> BlockTable:
    """diffusers UNet2DConditionModel module prefixes -> original names (relative to `diffusion_model.`)."""
    layers = int(config["layers_per_block"])
    table: BlockTable = {name: (ldm, NO_RENAMES) for name, ldm in UNET_TOP.items()}
    table.update(_unet_down_blocks(len(config["down_block_types"]), layers))
    table.update(_unet_up_blocks(list(config["up_block_types"]), layers))
    table.update(UNET_MID)
    return table


# --- VAE ----------------------------------------------------------------------------------------------

VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 # diffusers before 0.14 named them like this; accepted so old folders still convert
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _vae_coder_ends() -> BlockTable:
    table: BlockTable = {}
    for coder in ("encoder", "decoder"):
        table[f"{coder}.mid_block.attentions.0"] = (f"{coder}.mid.attn_1", VAE_ATTENTION)
        table[f"{coder}.mid_block.resnets.0"] = (f"{coder}.mid.block_1", VAE_RESNET)
        table[f"{coder}.mid_block.resnets.1"] = (f"{coder}.mid.block_2", VAE_RESNET)
        table[f"{coder}.conv_norm_out"] = (f"{coder}.norm_out", NO_RENAMES)
        for name in ("conv_in", "conv_out"):
            table[f"{coder}.{name}"] = (f"{coder}.{name}", NO_RENAMES)
    return table


def vae_table(config: Mapping[str, Any]) -> BlockTable:
    """diffusers AutoencoderKL module prefixes -> original names (relative to `first_stage_model.`)."""
    levels, layers = len(config["block_out_channels"]), int(config["layers_per_block"])
    table = _vae_coder_ends()
    for level in range(levels):
        for layer in range(layers):
            table[f"encoder.down_blocks.{level}.resnets.{layer}"] = (f"encoder.down.{level}.block.{layer}", VAE_RESNET)
        table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv",
                                                                    NO_RENAMES)
        # The decoder's up blocks are stored in reverse order in the original layout.
        original = levels - 1 - level
        for layer in range(layers + 1):
            table[f"decoder.up_blocks.{level}.resnets.{layer}"] = (f"decoder.up.{original}.block.{layer}", VAE_RESNET)
        table[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{original}.upsample.conv", NO_RENAMES)
    for name in ("quant_conv", "post_quant_conv"):
        table[name] = (name, NO_RENAMES)
    return table


# --- text encoders ------------------------------------------------------------------------------------

HF_LAYER_PREFIX = "text_model.encoder.layers."
# OpenCLIP (SD2's text encoder, SDXL's second) names of a transformers CLIP encoder layer's modules;
# q/k/v_proj have none: OpenCLIP fuses them into the attention's in_proj.
OPEN_CLIP_LAYER = {"self_attn": "attn", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
# Weights outside the layers: transformers key -> OpenCLIP key (the position embedding loses `.weight`).
OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_PROJECTION = ("text_projection.weight", "text_projection")  # stored transposed in OpenCLIP
QKV = ("q_proj", "k_proj", "v_proj")
# Where the host's module names for text encoders start: the original key prefix without these.
HOST_TEXT_ROOTS = ("cond_stage_model.", "conditioner.embedders.")


def hf_text_name(name: str) -> str:
    """transformers 4 name of a CLIP text model module (transformers 5 drops CLIPTextModel's `text_model.`)."""
    if not name or name.startswith(("text_model", "text_projection")):
        return name
    return f"text_model.{name}"


def open_clip_layer_name(hf_name: str) -> str | None:
    """HF CLIP encoder-layer module -> OpenCLIP module (`transformer.resblocks.N...`); None for q/k/v_proj."""
    if not hf_name.startswith(HF_LAYER_PREFIX):
        return None
    layer, _, part = hf_name[len(HF_LAYER_PREFIX):].partition(".")
    if part not in OPEN_CLIP_LAYER:
        return None
    return f"transformer.resblocks.{layer}.{OPEN_CLIP_LAYER[part]}"


def open_clip_layer_key(hf_key: str) -> str | None:
    """A layer weight's OpenCLIP key (`...mlp.c_fc.weight`); None for q/k/v (fused) and non-layer keys."""
    module, _, leaf = hf_key.rpartition(".")
    name = open_clip_layer_name(module)
    return None if name is None else f"{name}.{leaf}"


def host_text_prefix(ldm_prefix: str) -> str:
    """The host's module-name prefix of a text encoder: its original key prefix without the model root."""
    for root in HOST_TEXT_ROOTS:
        if ldm_prefix.startswith(root):
            return ldm_prefix[len(root):]
    return ldm_prefix


# --- applying tables ----------------------------------------------------------------------------------

def _rename_inside(rest: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def rename_module(name: str, table: BlockTable) -> str | None:
    """The original name of a module path or weight key by the longest matching prefix; None when none does."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            original, renames = table[prefix]
            rest = _rename_inside(".".join(parts[cut:]), renames)
            return f"{original}.{rest}" if rest else original
    return None


def convert_by_table(state_dict: Mapping[str, Any], table: BlockTable, prefix: str,
                     what: str) -> dict[str, Any]:
    """Every key renamed by the table and put under `prefix`; a key the table does not place is an error."""
    converted = {}
    for key, value in state_dict.items():
        name = rename_module(key, table)
        if name is None:
            raise ValueError(f"{what} weight {key!r} has no place in the original layout (unsupported architecture)")
        converted[prefix + name] = value
    return converted
