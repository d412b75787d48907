"""Name tables for LoRA files in the web UI's key format, and the host's own name matching.

Two directions live here:

* our side: which diffusers module gets which `lora_unet_…`/`lora_te…_` key when exported, named by
  the family's tables (dreambooth/families), the same tables the checkpoint export uses;
* the host's side: how A1111 1.10 (extensions-builtin/Lora/networks.py) resolves such a key to one of
  its modules. A1111 names every module of the original (ldm/"compvis") model by its dotted path with
  '_' and converts diffusers-style LoRA keys to those names with a few regular expressions. The
  functions below reimplement those rules so tests check our files against the host's matching, not
  against ours.

Everything is pure name arithmetic on module trees; nothing here loads weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..families import all_families, get_family
from ..families import tables as name_tables
from ..families.base import TextEncoder
from ..families.tables import hf_text_name

# Key prefix of each text encoder, by family: SD1/SD2 have one text encoder (lora_te_), SDXL two.
TE_PREFIXES = {family.name: tuple(encoder.lora_prefix for encoder in family.text_encoders)
               for family in all_families()}


def underscored(name: str) -> str:
    return name.replace(".", "_")


# --- diffusers UNet -> ldm module names (the family's table, shared with the checkpoint converter) -------

def unet_ldm_names(unet: Any, family: str | None = None) -> dict[str, str]:
    """Every weighted diffusers UNet module name -> its ldm name (under `diffusion_model.`)."""
    config = unet.config
    table = get_family(family).unet_table(config) if family else name_tables.unet_table(config)
    names: dict[str, str] = {}
    for name, module in unet.named_modules():
        if getattr(module, "weight", None) is None:
            continue
        ldm = name_tables.rename_module(name, table)
        if ldm is not None:
            names[name] = ldm
    return names


# --- our export keys -----------------------------------------------------------------------------------

def te_key(family: str, index: int, hf_name: str) -> str:
    """kohya-style text-encoder key: lora_te_/lora_te1_/lora_te2_ + the HF module path with '_'."""
    return f"{get_family(family).text_encoders[index].lora_prefix}_{underscored(hf_text_name(hf_name))}"


def unet_key(family: str, diffusers_name: str, ldm_name: str) -> str:
    """UNet key the host maps to this module.

    SD1/SD2: the diffusers-style name (kohya's SD1/SD2 format, measured exact in A1111) when A1111's
    converter maps it to the right ldm module. SDXL, and any block layout the converter's fixed
    arithmetic gets wrong (it assumes 2 layers per block and SD1's up-block layout): the ldm-style
    name, which the host resolves by replacing `lora_unet` with `diffusion_model` (kohya's SDXL format).
    """
    ldm_key = f"lora_unet_{underscored(ldm_name)}"
    if get_family(family).lora_unet_ldm_names:
        return ldm_key
    diffusers_key = f"lora_unet_{underscored(diffusers_name)}"
    if convert_diffusers_name_to_ldm(diffusers_key, is_sd2=False) == f"diffusion_model_{underscored(ldm_name)}":
        return diffusers_key
    return ldm_key


# --- the host's name matching (A1111 1.10 networks.py, reimplemented) -----------------------------------
# Kept apart from the families' tables on purpose: these are the host's own rules (fixed block
# arithmetic, its own resnet suffixes), the independent reference the tests hold our keys against.

_RESNET_SUFFIX_HOST = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                       "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _host_unet_rule(key: str) -> str | None:
    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{_kind(m[1])}_{_suffix(m[1], m[3])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_{_suffix(m[0], m[2])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_output_blocks_{int(m[0]) * 3 + int(m[2])}_{_kind(m[1])}_{_suffix(m[1], m[3])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m:
         f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m:
         f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
    )
    for pattern, build in rules:
        match = re.match(pattern, key)  # re.match: anchored at the start only, as in A1111
        if match:
            return build(match.groups())
    return None


def _kind(block: str) -> int:
    return 1 if block == "attentions" else 0


def _suffix(block: str, rest: str) -> str:
    return _RESNET_SUFFIX_HOST.get(rest, rest) if block == "resnets" else rest


def _host_te_rule(key: str, is_sd2: bool) -> str | None:
    match = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if match:
        layer, rest = match.groups()
        return f"model_transformer_resblocks_{layer}_{_openclip_rest(rest)}" if is_sd2 else \
            f"transformer_text_model_encoder_layers_{layer}_{rest}"
    match = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if match:
        layer, rest = match.groups()
        return f"1_model_transformer_resblocks_{layer}_{_openclip_rest(rest)}"
    return None


def _openclip_rest(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def convert_diffusers_name_to_ldm(key: str, is_sd2: bool) -> str:
    """A1111's convert_diffusers_name_to_compvis: unknown names come back unchanged."""
    return _host_unet_rule(key) or _host_te_rule(key, is_sd2) or key


@dataclass
class HostLayer:
    """One module as the host names it. kind: 'plain' (Linear/Conv2d/norm), 'mha' (OpenCLIP's fused
    attention, here the HF attention whose q/k/v/out_proj hold its slices) or 'mha_out' (the MHA's
    out_proj, which the host only changes through the MHA)."""

    module: Any
    kind: str = "plain"


def host_layer_mapping(family: str, unet: Any | None, text_encoders: list[Any]) -> dict[str, HostLayer]:
    """The host's network_layer_mapping for these (plain, un-adapted) diffusers models."""
    mapping: dict[str, HostLayer] = {}
    if unet is not None:
        modules = dict(unet.named_modules())
        for name, ldm in unet_ldm_names(unet, family).items():
            mapping[f"diffusion_model_{underscored(ldm)}"] = HostLayer(modules[name])
    for spec, encoder in zip(get_family(family).text_encoders, text_encoders, strict=False):
        mapping.update(_host_te_layers(spec, encoder))
    return mapping


def _host_te_layers(spec: TextEncoder, encoder: Any) -> Iterator[tuple[str, HostLayer]]:
    """The host names an encoder's modules by their original path below the model root."""
    for raw_name, module in encoder.named_modules():
        name = hf_text_name(raw_name)
        if spec.layout == "clip_l":
            yield underscored(spec.host_prefix + name), HostLayer(module)
            continue
        original = name_tables.open_clip_layer_name(name)
        if original is not None:
            kind = {"self_attn": "mha", "self_attn.out_proj": "mha_out"}.get(name.split(".", 4)[-1], "plain")
            yield underscored(spec.host_prefix + original), HostLayer(module, kind)


def resolve_host_key(base: str, mapping: dict[str, HostLayer], is_sd2: bool) -> str | None:
    """The host's name for a key (the part before the first '.'), or None when it matches no module.

    Follows load_network: converter, then the `_q/k/v_proj` -> fused-attention rule, then the
    fallbacks for ldm-style names (lora_unet_ -> diffusion_model_, lora_te1_text_model -> ...).
    Returns the sd_key A1111 files the weights under (for q/k/v that is the `_x_proj` name).
    """
    key = convert_diffusers_name_to_ldm(base, is_sd2)
    if key in mapping:
        return key
    x_proj = _X_PROJ.match(key)
    if x_proj and x_proj.group(1) in mapping:
        return key
    if "lora_unet" in base:
        key = base.replace("lora_unet", "diffusion_model")
        return key if key in mapping else None
    if "lora_te1_text_model" in base:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            key = base.replace("lora_te1_text_model", replacement)
            if key in mapping:
                return key
    return None


def host_is_sd2(mapping: dict[str, HostLayer]) -> bool:
    """A1111 decides SD2-ness by an OpenCLIP module name without the SDXL '1_' prefix."""
    return any(name.startswith("model_transformer_resblocks") for name in mapping)
