"""How Forge and ComfyUI match and apply a LoRA file's keys on a Flux.1 model, restated from reading their sources.

Facts, in our own words (no code copied); versions read:

* Forge, lllyasviel/stable-diffusion-webui-forge at dfdcbab685e57677014f05a3309b48cc87383167:
  extensions-builtin/sd_forge_lora/networks.py matches the file against the UNet key map first, gives what is
  left to the CLIP key map, and gives up on the file when more than 12 keys match nothing. The key maps and
  `load_lora` are packages_3rdparty/comfyui_lora_collection (ComfyUI's, vendored); backend/patcher/lora.py adds
  `lora_te1_`/`lora_te2_`/`lora_te3_` spellings for every T5 weight. Forge's Flux model (backend/nn/flux.py)
  holds the transformer in the original layout under `diffusion_model.`; its text encoders are `clip_l` and
  `t5xxl` (backend/diffusion_engine/flux.py), each with `.transformer.` and transformers' names.
* ComfyUI, comfy/lora.py at 41444b5236c613ee5ff7d09aa620f94b702f30eb (`model_lora_keys_unet`,
  `model_lora_keys_clip`, `load_lora`) and `flux_to_diffusers` in comfy/utils.py; the Flux rules are the ones
  Forge vendored, plus a generic `text_encoders.<weight>` spelling and T5 as `lora_te2_`/`lora_te3_` when CLIP-L
  is present.

The UNet key map of a Flux model: every weight `diffusion_model.<original>.weight` is reachable as
`lora_unet_<original with '_'>` and as `diffusion_model.<original>`; the diffusers names of `flux_to_diffusers`
(restated below from the source, independently of the project's own table) are reachable as
`transformer.<name>`, `lycoris_<name with '_'>` and `lora_transformer_<name with '_'>`, each pointing at the
original weight and, for a layer fused in the original, at its rows (dimension 0, first row, row count); the
final modulation's halves are swapped by a function. `load_lora` consumes, for a matched spelling X, the
tensors X.lora_up.weight + X.lora_down.weight (+ X.alpha, X.lora_mid.weight, X.dora_scale), X.diff, X.diff_b,
X.set_weight. Applying (strength s): delta = up @ down, times alpha / rank (rank = rows of down; 1 without
alpha), times s, added to the weight or to its rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

Target = tuple[str, tuple[int, int] | None]  # (model weight key, (first row, rows) or None for the whole weight)
LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".dora_scale", ".diff",
                 ".diff_b", ".set_weight")
CLIP_PARTS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def flux_to_diffusers(depth: int, single_depth: int, hidden: int, guidance: bool) -> dict[str, Target]:
    """ComfyUI's flux_to_diffusers for weights: diffusers weight key -> (original key, rows)."""
    rows: dict[str, Target] = {}
    for index in range(depth):
        block, original = f"transformer_blocks.{index}", f"double_blocks.{index}"
        for stream, names in (("img_attn", ("to_q", "to_k", "to_v")),
                              ("txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for slot, name in enumerate(names):
                rows[f"{block}.attn.{name}.weight"] = (f"{original}.{stream}.qkv.weight", (slot * hidden, hidden))
        for diffusers, ldm in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                               ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                               ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                               ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            rows[f"{block}.{diffusers}.weight"] = (f"{original}.{ldm}.weight", None)
    for index in range(single_depth):
        block, original = f"single_transformer_blocks.{index}", f"single_blocks.{index}"
        for slot, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            rows[f"{block}.{name}.weight"] = (f"{original}.linear1.weight", (slot * hidden, hidden))
        rows[f"{block}.proj_mlp.weight"] = (f"{original}.linear1.weight", (3 * hidden, 4 * hidden))
        rows[f"{block}.norm.linear.weight"] = (f"{original}.modulation.lin.weight", None)
        rows[f"{block}.proj_out.weight"] = (f"{original}.linear2.weight", None)
    top = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}
    if guidance:
        top.update({"time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"})
    rows.update({f"{name}.weight": (f"{ldm}.weight", None) for name, ldm in top.items()})
    return rows


def unet_key_map(original_weight_keys: Iterable[str], depth: int, single_depth: int, hidden: int,
                 guidance: bool) -> dict[str, Target]:
    """LoRA layer spelling -> (model weight, rows) for the transformer (`original_weight_keys`: without prefix)."""
    key_map: dict[str, Target] = {}
    for key in original_weight_keys:
        if key.endswith(".weight"):
            module = key.removesuffix(".weight")
            key_map[f"lora_unet_{_underscored(module)}"] = (f"diffusion_model.{key}", None)
            key_map[f"diffusion_model.{module}"] = (f"diffusion_model.{key}", None)
    for diffusers, (original, rows) in flux_to_diffusers(depth, single_depth, hidden, guidance).items():
        module = diffusers.removesuffix(".weight")
        target = (f"diffusion_model.{original}", rows)
        for spelling in (f"transformer.{module}", f"lycoris_{_underscored(module)}",
                         f"lora_transformer_{_underscored(module)}"):
            key_map[spelling] = target
    return key_map


def clip_key_map(clip_l_weight_keys: Iterable[str], t5_weight_keys: Iterable[str], forge: bool) -> dict[str, Target]:
    """Spellings of the CLIP-L (`clip_l.transformer.…`) and T5 (`t5xxl.transformer.…`) weights."""
    keys = set(clip_l_weight_keys)
    key_map: dict[str, Target] = {}
    for layer in range(32):
        for part, spelled in CLIP_PARTS.items():
            weight = f"clip_l.transformer.text_model.encoder.layers.{layer}.{part}.weight"
            if weight in keys:
                for spelling in (f"lora_te_text_model_encoder_layers_{layer}_{spelled}",
                                 f"lora_te1_text_model_encoder_layers_{layer}_{spelled}",
                                 f"text_encoder.text_model.encoder.layers.{layer}.{part}"):
                    key_map[spelling] = (weight, None)
    t5_prefixes = ("lora_te1_", "lora_te2_", "lora_te3_") if forge else ("lora_te2_", "lora_te3_")
    for weight in t5_weight_keys:
        module = _underscored(weight.removeprefix("t5xxl.transformer.").removesuffix(".weight"))
        key_map.update({f"{prefix}{module}": (weight, None) for prefix in t5_prefixes})
    if not forge:
        key_map.update({f"text_encoders.{key.removesuffix('.weight')}": (key, None) for key in keys})
    return key_map


def matches(file_keys: Iterable[str], key_map: dict[str, Target]) -> dict[str, Target]:
    """load_lora: the file tensors each spelling of the key map consumes -> the weight (and rows) they patch."""
    keys = set(file_keys)
    return {spelling + suffix: target for spelling, target in key_map.items() for suffix in LORA_SUFFIXES
            if spelling + suffix in keys}


def forge_matches(file_keys: Iterable[str], unet_map: dict[str, Target],
                  clip_map: dict[str, Target]) -> dict[str, Target]:
    """Forge: the UNet map first, the CLIP map on what is left."""
    matched = matches(file_keys, unet_map)
    matched.update(matches(set(file_keys) - set(matched), clip_map))
    return matched


def apply(weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key_map: dict[str, Target],
          strength: float = 1.0) -> list[str]:
    """Patch `weights` (model weight key -> tensor) as load_lora + the patcher do; returns the file keys no
    spelling consumed."""
    consumed: set[str] = set()
    for spelling, (key, rows) in key_map.items():
        delta = _delta(tensors, spelling, consumed)
        if delta is None:
            continue
        target = weights[key] if rows is None else weights[key].narrow(0, rows[0], rows[1])
        target += strength * delta.reshape(target.shape).to(target.dtype)
    return sorted(set(tensors) - consumed)


def _delta(tensors: dict[str, Any], spelling: str, consumed: set[str]) -> torch.Tensor | None:
    if f"{spelling}.diff" in tensors:
        consumed.add(f"{spelling}.diff")
        return tensors[f"{spelling}.diff"].float()
    up, down = tensors.get(f"{spelling}.lora_up.weight"), tensors.get(f"{spelling}.lora_down.weight")
    if up is None or down is None:
        return None
    consumed.update({f"{spelling}.lora_up.weight", f"{spelling}.lora_down.weight"})
    scale = 1.0
    if f"{spelling}.alpha" in tensors:
        consumed.add(f"{spelling}.alpha")
        scale = float(tensors[f"{spelling}.alpha"]) / down.shape[0]
    return scale * (up.float().flatten(1) @ down.float().flatten(1))
