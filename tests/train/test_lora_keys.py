"""LoRA key names against the host's rules, on full-size (meta-device) and tiny architectures.

The ldm name table is checked against diffusers' own single-file converter; the export keys are
checked against a reimplementation of A1111 1.10's name matching (lora_keys.resolve_host_key).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dreambooth.models.tiny import tiny_components
from dreambooth.train import lora, lora_keys

CONFIGS = Path(lora_keys.__file__).resolve().parent.parent / "resources" / "configs"


@functools.cache
def full_size_models(family: str) -> tuple[Any, list[Any]]:
    """The real UNet and text encoders of a family, without memory (meta device); shared, never changed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS / family
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        encoders = []
        for name in ("text_encoder", "text_encoder_2"):
            path = folder / name / "config.json"
            if path.is_file():
                data = json.loads(path.read_text())
                cls = CLIPTextModelWithProjection if "WithProjection" in data["architectures"][0] else CLIPTextModel
                encoders.append(cls(CLIPTextConfig.from_dict(data)))
    return unet, encoders


@functools.cache
def models(family: str, size: str) -> tuple[Any, list[Any]]:
    if size == "full":
        return full_size_models(family)
    components = tiny_components(family, seed=0)
    return components.denoiser, components.text_encoders


FAMILY_SIZES = [(family, size) for family in ("sd1", "sd2", "sd2v", "sdxl") for size in ("full", "tiny")]


@pytest.mark.parametrize(("family", "size"), FAMILY_SIZES)
def test_ldm_names_agree_with_diffusers_converter(family: str, size: str) -> None:
    """Renaming the UNet by our table and converting back with diffusers gives the same model."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet, _ = models(family, size)
    names = lora_keys.unet_ldm_names(unet)
    state = unet.state_dict()
    ldm = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        ldm[f"model.diffusion_model.{names[module]}.{leaf}"] = value
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(converted) == set(state)
    assert all(converted[key] is state[key] for key in state)


def expected_host_module(layer: lora_keys.HostLayer, sd_key: str) -> Any:
    """The module the host changes for a key: the layer itself, or a projection of fused attention."""
    if layer.kind == "mha":
        return getattr(layer.module, sd_key.rsplit("_", 2)[-2] + "_proj")
    return layer.module


def check_keys_map(family: str, unet: Any, encoders: list[Any]) -> list[str]:
    mapping = lora_keys.host_layer_mapping(family, unet, encoders)
    is_sd2 = lora_keys.host_is_sd2(mapping)
    assert is_sd2 == (family in ("sd2", "sd2v"))
    ldm_names = lora_keys.unet_ldm_names(unet)
    modules = dict(unet.named_modules())
    keys = []
    for name in lora.unet_target_names(unet, with_conv=True):
        key = lora_keys.unet_key(family, name, ldm_names[name])
        sd_key = lora_keys.resolve_host_key(key, mapping, is_sd2)
        assert sd_key is not None, f"{key} matches no module of the {family} UNet"
        assert mapping[sd_key].module is modules[name], f"{key} maps to the wrong module"
        keys.append(key)
    for index, encoder in enumerate(encoders):
        encoder_modules = dict(encoder.named_modules())
        for name in lora.text_encoder_target_names(encoder):
            key = lora_keys.te_key(family, index, name)
            sd_key = lora_keys.resolve_host_key(key, mapping, is_sd2)
            assert sd_key is not None, f"{key} matches no module of the {family} text encoder {index + 1}"
            layer = mapping.get(sd_key) or mapping[sd_key.rsplit("_", 2)[0]]
            assert expected_host_module(layer, sd_key) is encoder_modules[name], f"{key} maps to the wrong module"
            keys.append(key)
    return keys


@pytest.mark.parametrize(("family", "size"), FAMILY_SIZES)
def test_every_export_key_maps_to_its_module(family: str, size: str) -> None:
    unet, encoders = models(family, size)
    keys = check_keys_map(family, unet, encoders)
    assert len(keys) == len(set(keys))
    assert any(key.startswith("lora_unet_") for key in keys)
    prefixes = {key.split("_text_model")[0] for key in keys if not key.startswith("lora_unet_")}
    assert prefixes == set(lora_keys.TE_PREFIXES[family])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_sd1_sd2_use_diffusers_style_unet_names(family: str) -> None:
    """kohya's SD1/SD2 format, the one measured pixel-exact in A1111 1.10.1."""
    unet, _ = full_size_models(family)
    ldm_names = lora_keys.unet_ldm_names(unet)
    keys = [lora_keys.unet_key(family, name, ldm_names[name]) for name in lora.unet_target_names(unet, True)]
    assert all(key.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks"))
               for key in keys)


def test_sdxl_uses_ldm_style_unet_names() -> None:
    """A1111 maps SDXL's first upsampler wrongly from its diffusers name; the ldm name maps everywhere."""
    unet, _ = full_size_models("sdxl")
    mapping = lora_keys.host_layer_mapping("sdxl", unet, [])
    diffusers_key = "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert lora_keys.resolve_host_key(diffusers_key, mapping, False) is None
    ldm_names = lora_keys.unet_ldm_names(unet)
    keys = [lora_keys.unet_key("sdxl", name, ldm_names[name]) for name in lora.unet_target_names(unet, True)]
    assert "lora_unet_output_blocks_2_2_conv" in keys
    assert all(key.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
               for key in keys)


@pytest.mark.parametrize(("key", "is_sd2", "expected"), [
    ("lora_unet_down_blocks_1_attentions_1_proj_in", False, "diffusion_model_input_blocks_5_1_proj_in"),
    ("lora_unet_down_blocks_0_resnets_1_conv1", False, "diffusion_model_input_blocks_2_0_in_layers_2"),
    ("lora_unet_mid_block_resnets_1_time_emb_proj", False, "diffusion_model_middle_block_2_emb_layers_1"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", False, "diffusion_model_output_blocks_2_1_conv"),
    ("lora_unet_up_blocks_2_upsamplers_0_conv", False, "diffusion_model_output_blocks_8_2_conv"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", False, "diffusion_model_input_blocks_9_0_op"),
    ("lora_te_text_model_encoder_layers_3_mlp_fc1", True, "model_transformer_resblocks_3_mlp_c_fc"),
    ("lora_te_text_model_encoder_layers_3_self_attn_q_proj", True, "model_transformer_resblocks_3_attn_q_proj"),
    ("lora_te_text_model_encoder_layers_3_self_attn_q_proj", False,
     "transformer_text_model_encoder_layers_3_self_attn_q_proj"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc2", False, "1_model_transformer_resblocks_0_mlp_c_proj"),
    ("lora_unet_input_blocks_4_1_proj_in", False, "lora_unet_input_blocks_4_1_proj_in"),
])
def test_host_converter_follows_a1111(key: str, is_sd2: bool, expected: str) -> None:
    assert lora_keys.convert_diffusers_name_to_ldm(key, is_sd2) == expected


def test_misnamed_key_matches_nothing() -> None:
    unet, encoders = full_size_models("sd1")
    mapping = lora_keys.host_layer_mapping("sd1", unet, encoders)
    assert lora_keys.resolve_host_key("lora_unet_down_blocks_0_attentions_0_proj_inn", mapping, False) is None
    assert lora_keys.resolve_host_key("lora_te1_text_model_encoder_layers_0_mlp_fc1", mapping, False) is not None
    assert lora_keys.resolve_host_key("lora_te2_text_model_encoder_layers_0_mlp_fc1", mapping, False) is None
