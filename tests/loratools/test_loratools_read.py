"""Reading other trainers' LoRA spellings gives the same layers and changes as our own file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import fresh, write_trained_lora
from safetensors.torch import load_file, save_file

from dreambooth.errors import ModelError
from dreambooth.families import get_family
from dreambooth.loratools.read import components_key_table, guess_family, load_lora, read_lora, split_key
from dreambooth.train import lora_keys


def respell(tensors: dict[str, torch.Tensor], table: object, style: str) -> dict[str, torch.Tensor]:
    """Our file in another trainer's spelling: 'peft' (diffusers lora_A/B), 'comfy', 'ldm' (kohya ldm names)."""
    unet = fresh(table.family).denoiser
    ldm_names = lora_keys.unet_ldm_names(unet)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        base, part = key.split(".", 1)
        target = table.targets[base]
        if style == "ldm":
            base = f"lora_unet_{lora_keys.underscored(ldm_names[target.module])}" if target.part == "unet" else base
        elif target.part == "unet":
            base = f"unet.{target.module}" if style == "peft" else f"diffusion_model.{ldm_names[target.module]}"
        else:
            hf_name = lora_keys.hf_text_name(target.module)
            clip = "clip_l" if target.part == "text_encoder" and table.family != "sd2" else (
                "clip_h" if table.family == "sd2" else "clip_g")
            base = f"{target.part}.{hf_name}" if style == "peft" else f"text_encoders.{clip}.transformer.{hf_name}"
        if style == "peft":
            part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part, part)
        out[f"{base}.{part}"] = value
    return out


@pytest.mark.parametrize(("family", "style"), [("sd1", "peft"), ("sd1", "comfy"), ("sd1", "ldm"),
                                               ("sd2", "comfy"), ("sdxl", "peft"), ("sdxl", "comfy")])
def test_other_spellings_read_as_ours(family: str, style: str, tmp_path: Path) -> None:
    path = write_trained_lora(family, "locon", tmp_path / "ours.safetensors")
    ours = load_lora(path)
    table = components_key_table(fresh(family))
    theirs = read_lora(respell(load_file(str(path)), table, style), {}, table, "theirs")
    assert theirs.modules.keys() == ours.modules.keys()
    for key, module in ours.modules.items():
        torch.testing.assert_close(theirs.modules[key].delta(), module.delta(), msg=key)


def test_foreign_spelling_needs_a_family_and_unknown_layers_fail(tmp_path: Path) -> None:
    tensors = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(ModelError, match="model family"):
        read_lora(tensors)
    save_file(tensors, str(tmp_path / "peft.safetensors"))
    with pytest.raises(ModelError, match="family"):
        load_lora(tmp_path / "peft.safetensors")
    table = components_key_table(fresh("sd1"))
    bad = {"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32)}
    with pytest.raises(ModelError, match="names no layer"):
        read_lora(bad, {}, table)


def test_unsupported_modules_are_named() -> None:
    with pytest.raises(ModelError, match="hada"):
        split_key("lora_unet_x.hada_w1_a")
    with pytest.raises(ModelError, match="not a LoRA tensor"):
        split_key("lora_unet_x.something")
    assert split_key("unet.a.b.lora_A.default.weight") == ("unet.a.b", "down")
    assert split_key("lora_unet_x.dora_scale") == ("lora_unet_x", "dora_scale")


def test_family_guess() -> None:
    assert guess_family({"lora_te2_text_model_x.alpha": None}, {}) == "sdxl"
    assert guess_family({}, {"ss_base_model_version": "sd_v1"}) == "sd1"
    assert guess_family({}, {"ss_v2": "True", "ss_v_parameterization": "True"}) == "sd2v"
    # An SDXL v-prediction LoRA (ours, kohya's) names its objective: the sdxlv variant.
    assert guess_family({}, get_family("sdxlv").lora_markers()) == "sdxlv"
    assert guess_family({}, {"ss_base_model_version": "sdxl_base_v1-0", "ss_v_parameterization": "True"}) == "sdxlv"
    assert guess_family({}, get_family("sdxl").lora_markers()) == "sdxl"
    assert guess_family({"lora_unet_x.alpha": None}, {}) is None
