"""How the UIs' LoRA loaders match a file's keys to layers, restated from reading their sources.

Facts, rewritten in our own words (no code copied); the versions read:

* A1111 1.10.1, extensions-builtin/Lora/networks.py: replayed by dreambooth/train/lora_keys.py
  (`host_layer_mapping`, `resolve_host_key`); OpenCLIP's fused attention is changed only when the
  q, k, v and out_proj groups of a layer all arrive.
* ComfyUI, comfy/lora.py at 41444b5236c613ee5ff7d09aa620f94b702f30eb (`model_lora_keys_unet`,
  `model_lora_keys_clip`, `load_lora`), with `unet_to_diffusers` of comfy/utils.py and the UNet
  detection of comfy/model_detection.py (per-block transformer depths read from the checkpoint's keys,
  output blocks consumed in order).
* Forge, lllyasviel/stable-diffusion-webui-forge at dfdcbab685e57677014f05a3309b48cc87383167:
  extensions-builtin/sd_forge_lora/networks.py calls backend/patcher/lora.py, which takes the key maps
  and `load_lora` from packages_3rdparty/comfyui_lora_collection (ComfyUI's rules, vendored: the same
  UNet and CLIP maps, without ComfyUI's `lora_prior_` and `text_encoders.` extras). Forge's text
  encoders are transformers CLIP models under `clip_l` / `clip_h` / `clip_g` + `.transformer.`.
* SD.Next, vladmandic/sdnext at 058a7f0cf326f39c0135c6257d7b7e61073e51fd: modules/lora/lora_load.py
  splits a key at its first '.', modules/lora/lora_convert.py `KeyConvert` turns ldm-style UNet names
  into diffusers names with a fixed SD-layout table (2 layers per block, upsampler in slot 2) found by
  bisect among the sorted ldm prefixes, and looks the result up in `network_layer_mapping`: every
  diffusers/transformers module name with '.' -> '_' under lora_unet_ / lora_te_ (lora_te1_, lora_te2_
  when there are two text encoders).

Each `*_matches` function returns {file key: the layer it lands on}; keys missing from it are ignored
by that loader.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from typing import Any

from dreambooth.train import lora_keys

# The ComfyUI/Forge CLIP table: HF layer part -> its kohya spelling.
CLIP_PARTS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}
# Tensor suffixes the ComfyUI/Forge loader consumes for a matched layer (LoRA, LoCon, DoRA, full diff).
COMFY_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".dora_scale", ".diff",
                  ".diff_b", ".lora_B.weight", ".lora_A.weight")
RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
ATTENTION_PARTS = ("proj_in", "proj_out", "norm")
TRANSFORMER_PARTS = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
BASIC_PARTS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def layer_of(key: str) -> str:
    return key.split(".", 1)[0]


# --- ComfyUI and Forge -------------------------------------------------------------------------------------

def _depth(ldm_keys: set[str], block: str) -> int:
    """Transformer blocks under `block` (e.g. 'input_blocks.4.1'), as ComfyUI's detection counts them."""
    pattern = re.compile(re.escape(block) + r"\.transformer_blocks\.(\d+)\.")
    return len({match.group(1) for key in ldm_keys if (match := pattern.match(key))})


def _unet_layout(ldm_keys: set[str]) -> tuple[list[int], list[int], list[int], int]:
    """(res blocks per level, depth per input res block, depth per output block, middle depth)."""
    res_per_level, in_depths, count, index = [], [], 0, 1
    while any(key.startswith(f"input_blocks.{index}.") for key in ldm_keys):
        if f"input_blocks.{index}.0.op.weight" in ldm_keys:
            res_per_level.append(count)
            count = 0
        elif f"input_blocks.{index}.0.in_layers.0.weight" in ldm_keys:
            count += 1
            in_depths.append(_depth(ldm_keys, f"input_blocks.{index}.1"))
        index += 1
    res_per_level.append(count)
    out_count = len({key.split(".")[1] for key in ldm_keys if key.startswith("output_blocks.")})
    out_depths = [_depth(ldm_keys, f"output_blocks.{index}.1") for index in range(out_count)]
    return res_per_level, in_depths, out_depths, _depth(ldm_keys, "middle_block.1")


def _attention_rows(diffusers: str, ldm: str, depth: int) -> dict[str, str]:
    rows = {f"{diffusers}.{part}": f"{ldm}.{part}" for part in ATTENTION_PARTS}
    for block in range(depth):
        rows.update({f"{diffusers}.transformer_blocks.{block}.{part}": f"{ldm}.transformer_blocks.{block}.{part}"
                     for part in TRANSFORMER_PARTS})
    return rows


def _resnet_rows(diffusers: str, ldm: str) -> dict[str, str]:
    return {f"{diffusers}.{part}": f"{ldm}.{ldm_part}" for part, ldm_part in RESNET_PARTS.items()}


def comfy_diffusers_table(ldm_keys: set[str]) -> dict[str, str]:
    """ComfyUI's unet_to_diffusers, by module: diffusers module name -> ldm module name."""
    res_per_level, in_depths, out_depths, mid_depth = _unet_layout(ldm_keys)
    in_depths, out_depths = list(in_depths), list(out_depths)
    rows: dict[str, str] = {}
    for level, count in enumerate(res_per_level):
        block = 1 + (count + 1) * level
        for layer in range(count):
            rows.update(_resnet_rows(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{block}.0"))
            depth = in_depths.pop(0)
            if depth:
                rows.update(_attention_rows(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{block}.1", depth))
            block += 1
        rows[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
    rows.update(_attention_rows("mid_block.attentions.0", "middle_block.1", mid_depth))
    rows.update({**_resnet_rows("mid_block.resnets.0", "middle_block.0"),
                 **_resnet_rows("mid_block.resnets.1", "middle_block.2")})
    for level, count in enumerate(reversed(res_per_level)):
        block = (count + 1) * level
        for layer in range(count + 1):
            rows.update(_resnet_rows(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{block}.0"))
            slot = 1
            depth = out_depths.pop(0)  # ComfyUI pops the list it stored last-output-block first
            if depth:
                slot = 2
                rows.update(_attention_rows(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{block}.1",
                                            depth))
            if layer == count:
                rows[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{block}.{slot}.conv"
            block += 1
    rows.update(BASIC_PARTS)
    return rows


def comfy_unet_key_map(ldm_weight_keys: Iterable[str], forge: bool = False) -> dict[str, str]:
    """LoRA layer spelling -> model weight key for the UNet (`ldm_weight_keys`: 'diffusion_model.….weight')."""
    keys = set(ldm_weight_keys)
    key_map: dict[str, str] = {}
    for key in keys:
        module = key.removeprefix("diffusion_model.").removesuffix(".weight")
        key_map[f"lora_unet_{lora_keys.underscored(module)}"] = key
        key_map[key.removesuffix(".weight")] = key
        if not forge:
            key_map[f"lora_prior_unet_{lora_keys.underscored(module)}"] = key
    inner = {key.removeprefix("diffusion_model.") for key in keys}
    for diffusers, ldm in comfy_diffusers_table(inner).items():
        target = f"diffusion_model.{ldm}.weight"
        key_map[f"lora_unet_{lora_keys.underscored(diffusers)}"] = target
        key_map[f"lycoris_{lora_keys.underscored(diffusers)}"] = target
        processor = diffusers.replace(".to_", ".processor.to_")
        if processor.endswith(".to_out.0"):
            processor = processor[:-2]
        key_map[processor] = key_map[f"unet.{processor}"] = target
    return key_map


def comfy_clip_key_map(clip_weight_keys: Iterable[str]) -> dict[str, str]:
    """LoRA layer spelling -> model weight key for the text encoders ('clip_l.transformer.text_model.…')."""
    keys = set(clip_weight_keys)
    key_map: dict[str, str] = {}
    has_clip_l = False
    for layer in range(32):
        for part, spelled in CLIP_PARTS.items():
            suffix = f"transformer.text_model.encoder.layers.{layer}.{part}.weight"
            kohya = f"text_model_encoder_layers_{layer}_{spelled}"
            diffusers = f"text_model.encoder.layers.{layer}.{part}"
            for clip in ("clip_h", "clip_l"):
                if f"{clip}.{suffix}" in keys:
                    for name in (f"lora_te_{kohya}", f"lora_te1_{kohya}", f"text_encoder.{diffusers}"):
                        key_map[name] = f"{clip}.{suffix}"
                    has_clip_l = has_clip_l or clip == "clip_l"
            if f"clip_g.{suffix}" in keys:
                names = (f"lora_te2_{kohya}", f"text_encoder_2.{diffusers}") if has_clip_l else (
                    f"lora_te_{kohya}", f"text_encoder.{diffusers}")
                key_map.update(dict.fromkeys(names, f"clip_g.{suffix}"))
    return key_map


def comfy_matches(file_keys: Iterable[str], key_map: dict[str, str]) -> dict[str, str]:
    """load_lora: for every spelling in the key map, the file tensors it consumes -> the weight they patch."""
    keys = set(file_keys)
    matched: dict[str, str] = {}
    for spelling, target in key_map.items():
        for suffix in COMFY_SUFFIXES:
            if spelling + suffix in keys:
                matched[spelling + suffix] = target
    return matched


def comfy_model_keys(family: str, unet_ldm_names: Iterable[str], text_encoders: list[Any]) -> tuple[set, set]:
    """The UNet and CLIP weight keys of the model as ComfyUI/Forge hold it (ldm UNet, HF-layout CLIP)."""
    unet = {f"diffusion_model.{name}.weight" for name in unet_ldm_names}
    clip_names = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sd2v": ("clip_h",), "sdxl": ("clip_l", "clip_g")}[family]
    clip = {f"{clip}.transformer.{lora_keys.hf_text_name(name)}.weight"
            for clip, encoder in zip(clip_names, text_encoders, strict=True)
            for name, module in encoder.named_modules() if getattr(module, "weight", None) is not None}
    return unet, clip


# --- SD.Next -----------------------------------------------------------------------------------------------

def sdnext_ldm_to_diffusers() -> dict[str, str]:
    """KeyConvert's fixed table ('_'-joined prefixes): ldm -> diffusers, for the real SD1/SD2/SDXL layouts."""
    pairs: list[tuple[str, str]] = []
    for level in range(4):
        for layer in range(2):
            pairs.append((f"input_blocks.{3 * level + layer + 1}.0.", f"down_blocks.{level}.resnets.{layer}."))
            if level < 3:
                pairs.append((f"input_blocks.{3 * level + layer + 1}.1.", f"down_blocks.{level}.attentions.{layer}."))
        for layer in range(3):
            pairs.append((f"output_blocks.{3 * level + layer}.0.", f"up_blocks.{level}.resnets.{layer}."))
            pairs.append((f"output_blocks.{3 * level + layer}.1.", f"up_blocks.{level}.attentions.{layer}."))
        if level < 3:
            pairs.append((f"input_blocks.{3 * (level + 1)}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * level + 2}.2.", f"up_blocks.{level}.upsamplers.0."))
    pairs += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
              ("middle_block.2.", "mid_block.resnets.1.")]
    expanded: list[tuple[str, str]] = []
    for ldm, diffusers in pairs:
        if "resnets" in diffusers:
            expanded += [(ldm + part + ".", diffusers + name + ".") for name, part in RESNET_PARTS.items()]
        else:
            expanded.append((ldm, diffusers))
    expanded += [(f"{ldm}.", f"{diffusers}.") for diffusers, ldm in BASIC_PARTS.items() if "class_" not in diffusers]
    return {lora_keys.underscored(ldm)[:-1]: lora_keys.underscored(diffusers)[:-1] for ldm, diffusers in expanded}


def sdnext_layer_mapping(unet: Any, text_encoders: list[Any]) -> dict[str, str]:
    """network_layer_mapping: '_'-joined module names -> the dotted module name ('part:name')."""
    mapping: dict[str, str] = {}
    te_prefixes = ("lora_te1_", "lora_te2_") if len(text_encoders) == 2 else ("lora_te_",)
    for prefix, part, model in [(p, f"text_encoder{'' if i == 0 else '_2'}", m)
                                for i, (p, m) in enumerate(zip(te_prefixes, text_encoders, strict=True))] + [
            ("lora_unet_", "unet", unet)]:
        for name, _ in model.named_modules():
            mapping[prefix + lora_keys.underscored(name)] = f"{part}:{name}"
    return mapping


def sdnext_convert(base: str, table: dict[str, str], sorted_keys: list[str]) -> str:
    """KeyConvert.__call__'s renaming of one layer spelling (before the mapping lookup)."""
    if "diffusion_model" in base:
        base = base.replace("diffusion_model", "lora_unet")
    search = base
    for prefix in ("lora_unet_", "oft_unet_", "lora_te1_", "lora_te2_"):
        search = search.replace(prefix, "")
    # As in SD.Next, position 0 wraps around to the last prefix (which then fails the startswith test).
    candidate = sorted_keys[bisect.bisect_right(sorted_keys, search) - 1]
    if search.startswith(candidate):
        base = base.replace(candidate, table[candidate]).replace("oft", "lora")
    return base


def sdnext_matches(file_keys: Iterable[str], mapping: dict[str, str]) -> dict[str, str]:
    table = sdnext_ldm_to_diffusers()
    sorted_keys = sorted(table)
    matched = {}
    for key in file_keys:
        converted = sdnext_convert(layer_of(key), table, sorted_keys)
        target = mapping.get(converted)
        if target is None and converted.startswith("lora_te"):  # transformers >= 5.6 drops 'text_model'
            target = mapping.get(converted.replace("_text_model_", "_", 1))
        if target is not None:
            matched[key] = target
    return matched
