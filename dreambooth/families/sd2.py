"""Stable Diffusion 2.x: one OpenCLIP ViT-H text encoder; sd2 = 512 px epsilon, sd2v = 768 px v-prediction.

Both share the weights' layout (one architecture); A1111 tells them apart by the yaml beside the file
(`parameterization: "v"`), which export writes for v-prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ModelFamily, TextEncoder
from .sd1 import tiny_sd1_configs

OPEN_CLIP_H = TextEncoder(folder="text_encoder", tokenizer_folder="tokenizer", layout="open_clip",
                          ldm_prefix="cond_stage_model.model.", lora_prefix="lora_te", pad_token="!")
V_YAML = "sd2v/v2-inference-v.yaml"
# SD2's OpenCLIP keeps one more transformer layer than diffusers uses (the penultimate layer's output
# conditions the UNet); the tiny file holds 3, the diffusers model 2.
TINY_FILE_LAYERS = 3


class StableDiffusion2(ModelFamily):
    def tiny_configs(self) -> dict[str, dict[str, Any]]:
        configs = tiny_sd1_configs()
        configs["unet"].update(attention_head_dim=[2, 4], use_linear_projection=True,
                               sample_size=12 if self.prediction_type == "v_prediction" else 8)
        configs["text_encoder"].update(num_hidden_layers=TINY_FILE_LAYERS - 1, hidden_act="gelu")
        return configs

    def tiny_extras(self, configs: Mapping[str, Mapping[str, Any]], generator: Any) -> dict[str, Any]:
        """The OpenCLIP keys of an SD2 file that the diffusers text encoder does not hold."""
        import torch

        text = configs["text_encoder"]
        hidden, inner = text["hidden_size"], text["intermediate_size"]
        prefix = f"{OPEN_CLIP_H.ldm_prefix}transformer.resblocks.{TINY_FILE_LAYERS - 1}."
        shapes = {"attn.in_proj_weight": (3 * hidden, hidden), "attn.in_proj_bias": (3 * hidden,),
                  "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,),
                  "ln_1.weight": (hidden,), "ln_1.bias": (hidden,), "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
                  "mlp.c_fc.weight": (inner, hidden), "mlp.c_fc.bias": (inner,),
                  "mlp.c_proj.weight": (hidden, inner), "mlp.c_proj.bias": (hidden,)}
        extras = {prefix + name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        extras[f"{OPEN_CLIP_H.ldm_prefix}text_projection"] = 0.02 * torch.randn((hidden, text["projection_dim"]),
                                                                                 generator=generator)
        extras[f"{OPEN_CLIP_H.ldm_prefix}logit_scale"] = torch.tensor(4.6052)
        return extras


_COMMON: dict[str, Any] = {"architecture": "sd2", "text_encoders": (OPEN_CLIP_H,),
                           "pipeline_class": "StableDiffusionPipeline", "v_yaml": V_YAML,
                           "resolution_range": (256, 1024)}
# Activations: SD1's UNet with wider cross-attention (3.2 GiB at 512 px); the 768 model has 2.25x the pixels.
SD2 = StableDiffusion2(name="sd2", label="SD 2.x 512, epsilon", prediction_type="epsilon", resolution=512,
                       lora_base_model_version="sd_v2_512", activation_gib=3.2, **_COMMON)
SD2V = StableDiffusion2(name="sd2v", label="SD 2.x 768, v-prediction", prediction_type="v_prediction",
                        resolution=768, lora_base_model_version="sd_v2_768_v", activation_gib=7.2, **_COMMON)
FAMILIES = (SD2, SD2V)
