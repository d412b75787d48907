"""How the UIs' LoRA loaders match an SD3 / SD 3.5 LoRA's keys, restated from reading their sources (facts in
our own words, no code copied). Each `*_matches` returns {file key: the layer it lands on}; keys missing from it
are ignored by that loader, and `LoadFailure` is raised where the loader gives up on the whole file.

* A1111 1.10.1: extensions-builtin/Lora/networks.py (`load_network`, `network_apply_weights`) and
  modules/models/sd3/sd3_model.py (`diffusers_weight_mapping`). Layers are named by their module path with '_':
  the text encoders under SD3Cond (`clip_l_transformer_text_model_…`, `clip_g_…`, `t5xxl_…`) and the MMDiT
  under `diffusion_model_` in the single file's names. With an SD3 model loaded every key is cut at its last
  two dots (a key with fewer dots makes the load fail); the front part goes through the diffusers map, which
  lists only `transformer.transformer_blocks.N.attn.to_q/to_k/to_v/to_out.0` (its context-stream entries
  contain a '.' where the layer names have '_', so they never match); a `_q_proj/_k_proj/_v_proj` ending names a
  third of a fused q/k/v; then `lora_unet` becomes `diffusion_model`, and `lora_te1_text_model` becomes
  `0_transformer_text_model` or `transformer_text_model`. `.alpha` missing means scale 1.
* ComfyUI 41444b5 (comfy/lora.py `model_lora_keys_unet`, `model_lora_keys_clip`, comfy/utils.py
  `mmdit_to_diffusers`): each weight `diffusion_model.X.weight` is reached as `lora_unet_<X with _>` and as
  `diffusion_model.X`; SD3 models add `transformer.<diffusers module>`, `base_model.model.<…>` and
  `lora_transformer_<… with _>` (q/k/v as thirds of the fused weight, the block width taken as 64 x depth).
  CLIP: `lora_te1_text_model_encoder_layers_N_<part>` (clip_l), `lora_te2_…` (clip_g when clip_l is there),
  `text_encoder(_2).text_model.encoder.layers.N.<part>`, `text_encoders.<model key>`; T5 `lora_te3_<…>`.
* Forge dfdcbab: backend/patcher/lora.py over packages_3rdparty/comfyui_lora_collection: ComfyUI's generic
  `lora_unet_`/`diffusion_model.` and CLIP rules; its SD3 diffusers-name branch is commented out.
* SD.Next 058a7f0: modules/lora/lora_load.py and lora_convert.py. For SD3 a kohya conversion runs first: each
  `lora_unet_joint_blocks_N_<x|context>_block_<attn_qkv|attn_proj|mlp_fc1|mlp_fc2|adaLN_modulation_1>` key
  present is converted and must come with its `.alpha` (else the load fails); if other keys than `lora_te1…`
  remain the conversion is dropped and the file read as it is. A key whose first part is clip_l/clip_g/t5/unet/
  transformer loses its trailing alpha/weight/lora_up/lora_down parts and is joined with '_' (`lora_` added for
  unet/transformer); others are cut at the first dot. Layers: `lora_te1_`+CLIP-L, `lora_te2_`+CLIP-G and
  `lora_transformer_`+transformer module names (diffusers').
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TENSOR_ENDINGS = (".lora_up.weight", ".lora_down.weight", ".lora_B.weight", ".lora_A.weight", ".alpha")
CLIP_PARTS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


class LoadFailure(Exception):
    """The loader rejects the whole file."""


def underscored(name: str) -> str:
    return name.replace(".", "_")


def layer_of(key: str) -> str:
    return next(key[:-len(end)] for end in TENSOR_ENDINGS if key.endswith(end))


# --- A1111 1.10.1 -------------------------------------------------------------------------------------------------

def a1111_layers(model_keys: Iterable[str]) -> set[str]:
    """A1111's layer names of an SD3 model from its single-file keys (model.diffusion_model.*, text_encoders.*)."""
    layers = set()
    for key in model_keys:
        module = key.rpartition(".")[0]
        if key.startswith("model.diffusion_model."):
            layers.add(underscored(module[len("model."):]))
        elif key.startswith("text_encoders."):
            layers.add(underscored(module[len("text_encoders."):]))
    return layers


def a1111_diffusers_map(depth: int) -> dict[str, str]:
    mapping = {}
    for i in range(depth):
        for name, suffix in (("to_q", "qkv_q_proj"), ("to_k", "qkv_k_proj"), ("to_v", "qkv_v_proj"), ("to_out.0", "proj")):
            mapping[f"transformer.transformer_blocks.{i}.attn.{name}"] = f"diffusion_model_joint_blocks_{i}_x_block_attn_{suffix}"
        for name, suffix in (("add_q_proj", "qkv_q_proj"), ("add_k_proj", "qkv_k_proj"), ("add_v_proj", "qkv_v_proj")):
            mapping[f"transformer.transformer_blocks.{i}.attn.{name}"] = (
                f"diffusion_model_joint_blocks_{i}_context_block.attn_{suffix}")
        mapping[f"transformer.transformer_blocks.{i}.attn.add_out_proj.0"] = f"diffusion_model_joint_blocks_{i}_context_block_attn_proj"
    return mapping


def a1111_matches(keys: Iterable[str], layers: set[str], depth: int) -> dict[str, str]:
    mapping = a1111_diffusers_map(depth)
    matched = {}
    for key in keys:
        if key.count(".") < 2:
            raise LoadFailure(f"{key}: fewer than two dots")
        front = key.rsplit(".", 2)[0]
        found = mapping.get(front, front)
        fused = re.match(r"(.*)_([qkv]_proj)$", found)
        if found in layers or (fused and fused.group(1) in layers):
            matched[key] = found
        elif "lora_unet" in front and front.replace("lora_unet", "diffusion_model") in layers:
            matched[key] = front.replace("lora_unet", "diffusion_model")
        elif "lora_te1_text_model" in front:
            for replacement in ("0_transformer_text_model", "transformer_text_model"):
                if front.replace("lora_te1_text_model", replacement) in layers:
                    matched[key] = front.replace("lora_te1_text_model", replacement)
    return matched


# --- ComfyUI and Forge --------------------------------------------------------------------------------------------

def comfy_mmdit_attention(depth: int) -> dict[str, str]:
    """The attention rows of ComfyUI's mmdit_to_diffusers: diffusers module -> original module (q/k/v: fused)."""
    table = {}
    for i in range(depth):
        block = f"transformer_blocks.{i}"
        for stream, names in (("x_block.attn", ("attn.to_q", "attn.to_k", "attn.to_v")),
                              ("context_block.attn", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
                              ("x_block.attn2", ("attn2.to_q", "attn2.to_k", "attn2.to_v"))):
            table.update({f"{block}.{name}": f"joint_blocks.{i}.{stream}.qkv" for name in names})
        table.update({f"{block}.attn.to_out.0": f"joint_blocks.{i}.x_block.attn.proj",
                      f"{block}.attn.to_add_out": f"joint_blocks.{i}.context_block.attn.proj",
                      f"{block}.attn2.to_out.0": f"joint_blocks.{i}.x_block.attn2.proj"})
    return table


def comfy_key_map(model_keys: Iterable[str], depth: int, forge: bool = False) -> dict[str, str]:
    """LoRA layer spelling -> model weight it patches (Forge: without the SD3 diffusers spellings)."""
    model_keys = list(model_keys)
    key_map: dict[str, str] = {}
    clip_l = any(k.startswith("text_encoders.clip_l.") for k in model_keys)
    for key in model_keys:
        if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
            inner = key[len("model.diffusion_model."):-len(".weight")]
            key_map[f"lora_unet_{underscored(inner)}"] = key
            key_map[f"diffusion_model.{inner}"] = key
        if key.startswith("text_encoders.") and key.endswith(".weight"):
            comfy = key[len("text_encoders."):-len(".weight")]
            key_map[f"text_encoders.{comfy}"] = key
            _clip_spellings(key_map, comfy, key, clip_l)
    if not forge:
        for diffusers, original in comfy_mmdit_attention(depth).items():
            target = f"model.diffusion_model.{original}.weight"
            for spelling in (f"transformer.{diffusers}", f"base_model.model.{diffusers}",
                             f"lora_transformer_{underscored(diffusers)}"):
                key_map[spelling] = target
    return key_map


def _clip_spellings(key_map: dict[str, str], comfy: str, key: str, clip_l: bool) -> None:
    found = re.match(r"(clip_[lg])\.transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)$", comfy)
    if found and found.group(3) in CLIP_PARTS:
        encoder, block, part = found.groups()
        index = "1" if encoder == "clip_l" else "2" if clip_l else ""
        key_map[f"lora_te{index}_text_model_encoder_layers_{block}_{underscored(part)}"] = key
        folder = "text_encoder" if index in ("1", "") else "text_encoder_2"
        key_map[f"{folder}.text_model.encoder.layers.{block}.{part}"] = key
    if comfy.startswith("t5xxl.transformer."):
        key_map[f"lora_te3_{underscored(comfy[len('t5xxl.transformer.'):])}"] = key


def comfy_matches(keys: Iterable[str], key_map: dict[str, str]) -> dict[str, str]:
    return {key: key_map[layer_of(key)] for key in keys if layer_of(key) in key_map}


# --- SD.Next ------------------------------------------------------------------------------------------------------

KOHYA_SD3 = re.compile(r"lora_unet_joint_blocks_\d+_(x|context)_block_(attn_qkv|attn_proj|mlp_fc1|mlp_fc2|"
                       r"adaLN_modulation_1)$")


def sdnext_layers(transformer_modules: Iterable[str], clip_l: Iterable[str], clip_g: Iterable[str]) -> set[str]:
    return ({f"lora_transformer_{underscored(name)}" for name in transformer_modules}
            | {f"lora_te1_{underscored(name)}" for name in clip_l} | {f"lora_te2_{underscored(name)}" for name in clip_g})


def sdnext_matches(keys: Iterable[str], layers: set[str]) -> dict[str, str]:
    keys = list(keys)
    kohya = {key.split(".")[0] for key in keys if KOHYA_SD3.match(key.split(".")[0])}
    missing_alpha = sorted(layer for layer in kohya if f"{layer}.alpha" not in keys)
    if missing_alpha:
        raise LoadFailure(f"{missing_alpha[0]}.alpha is missing")
    if kohya:
        raise NotImplementedError("our files never need SD.Next's kohya conversion")
    matched = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] in ("clip_l", "clip_g", "t5", "unet", "transformer"):
            while parts and parts[-1] in ("alpha", "weight", "lora_up", "lora_down"):
                parts = parts[:-1]
            front = "_".join(parts)
            front = "lora_" + front if front.startswith(("unet", "transformer")) else front
        else:
            front = key.split(".", 1)[0]
        if front in layers:
            matched[key] = front
    return matched
