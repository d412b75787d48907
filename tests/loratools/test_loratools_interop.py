"""Interop proof: every key of the LoRA files we write is matched, to the right layer, by the loaders of
A1111 1.10, Forge, SD.Next and ComfyUI (their rules restated in loader_rules.py, versions noted there).

Two sets of files per family (sd1, sd2, sdxl) and kind (LoRA, LoCon, DoRA):
* the tiny models' real exports (A1111, ComfyUI, Forge; SD.Next's fixed SD-layout table assumes the
  real block counts, so tiny layouts are not meaningful for it);
* the full-size layouts (models built on the meta device from the shipped configs), whose key sets come
  from the same naming functions the exporter uses - the tiny test proves that key set equals the file's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import loader_rules as rules
import pytest
from lora_helpers import fresh, write_trained_lora
from safetensors.torch import load_file

from dreambooth.loratools.extract import target_layers
from dreambooth.loratools.read import full_size_components
from dreambooth.train import lora_keys

FAMILIES = ("sd1", "sd2", "sdxl")
KINDS = ("lora", "locon", "dora")


def written_keys(components: Any, kind: str) -> dict[str, tuple[str, str]]:
    """Every tensor key our exporter writes for `kind` -> (part, module name) of its layer."""
    suffixes = (".diff",) if kind == "dora" else (".lora_down.weight", ".lora_up.weight", ".alpha")
    layers = target_layers(components, with_conv=kind != "lora")
    return {key + suffix: layer for key, layer in layers.items() for suffix in suffixes}


def expected_weight_key(components: Any, ldm_names: dict[str, str], part: str, name: str) -> str:
    """The model weight ComfyUI/Forge must patch for our layer (ldm UNet names, HF CLIP names)."""
    if part == "unet":
        return f"diffusion_model.{ldm_names[name]}.weight"
    clip = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}[components.family]
    return f"{clip[0 if part == 'text_encoder' else 1]}.transformer.{lora_keys.hf_text_name(name)}.weight"


def check_comfy(components: Any, keys: dict[str, tuple[str, str]], forge: bool) -> None:
    ldm_names = lora_keys.unet_ldm_names(components.denoiser)
    unet_keys, clip_keys = rules.comfy_model_keys(components.family, ldm_names.values(), list(components.text_encoders))
    unet_map = rules.comfy_unet_key_map(unet_keys, forge=forge)
    # Forge matches the UNet first and gives what is left to the CLIP map; ComfyUI merges both maps.
    matched = rules.comfy_matches(keys, unet_map)
    matched.update(rules.comfy_matches(set(keys) - set(matched), rules.comfy_clip_key_map(clip_keys)))
    assert sorted(set(keys) - set(matched)) == []
    wrong = {key: target for key, target in matched.items() if target != expected_weight_key(components, ldm_names, *keys[key])}
    assert wrong == {}


def check_a1111(components: Any, keys: dict[str, tuple[str, str]]) -> None:
    mapping = lora_keys.host_layer_mapping(components.family, components.denoiser, list(components.text_encoders))
    is_sd2 = lora_keys.host_is_sd2(mapping)
    parts = {"unet": components.denoiser, "text_encoder": components.text_encoders[0],
             "text_encoder_2": components.text_encoders[-1]}
    fused: dict[str, set[str]] = {}
    for key, (part, name) in keys.items():
        sd_key = lora_keys.resolve_host_key(rules.layer_of(key), mapping, is_sd2)
        assert sd_key is not None, key
        module = parts[part].get_submodule(name)
        if sd_key in mapping:  # a plain layer, or the out_proj of OpenCLIP's fused attention
            assert mapping[sd_key].module is module, key
            if mapping[sd_key].kind == "mha_out":
                fused.setdefault(sd_key.removesuffix("_out_proj"), set()).add("out_proj")
            continue
        attention, projection = re.fullmatch(r"(.*)_([qkv]_proj)", sd_key).groups()
        assert mapping[attention].module is parts[part].get_submodule(name.rsplit(".", 1)[0]), key
        fused.setdefault(attention, set()).add(projection)
    # OpenCLIP's fused attention is only changed when q, k, v and out_proj all come.
    assert all(found == {"q_proj", "k_proj", "v_proj", "out_proj"} for found in fused.values()), fused
    assert bool(fused) == (components.family != "sd1")


def check_sdnext(components: Any, keys: dict[str, tuple[str, str]]) -> None:
    mapping = rules.sdnext_layer_mapping(components.denoiser, list(components.text_encoders))
    matched = rules.sdnext_matches(keys, mapping)
    assert sorted(set(keys) - set(matched)) == []
    wrong = {key: target for key, target in matched.items() if target != ":".join(keys[key])}
    assert wrong == {}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_files_match_every_loader(family: str, kind: str, tmp_path: Path) -> None:
    components = fresh(family)
    path = write_trained_lora(family, kind, tmp_path / "lora.safetensors")
    keys = written_keys(components, kind)
    assert set(load_file(str(path))) == set(keys)  # the key set the full-size checks use is the file's
    check_a1111(components, keys)
    check_comfy(components, keys, forge=False)
    check_comfy(components, keys, forge=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_full_size_layouts_match_every_loader(family: str, kind: str) -> None:
    components = full_size_components(family)
    keys = written_keys(components, kind)
    check_a1111(components, keys)
    check_comfy(components, keys, forge=False)
    check_comfy(components, keys, forge=True)
    check_sdnext(components, keys)


def test_replayed_loaders_do_reject_foreign_keys() -> None:
    """The replays are not vacuous: a misnamed layer, and SD1 keys given to SDXL, stay unmatched."""
    components = full_size_components("sdxl")
    keys = {"lora_unet_down_blocks_9_attentions_0_proj_in.alpha": ("unet", "x")}
    mapping = rules.sdnext_layer_mapping(components.denoiser, list(components.text_encoders))
    assert rules.sdnext_matches(keys, mapping) == {}
    unet_keys, clip_keys = rules.comfy_model_keys("sdxl", lora_keys.unet_ldm_names(components.denoiser).values(),
                                                  list(components.text_encoders))
    assert rules.comfy_matches(keys, rules.comfy_unet_key_map(unet_keys)) == {}
    sd1_keys = written_keys(full_size_components("sd1"), "lora")
    sd1_unet = [key for key in sd1_keys if key.startswith("lora_unet_")]
    assert len(rules.comfy_matches(sd1_unet, rules.comfy_unet_key_map(unet_keys))) < len(sd1_unet)
