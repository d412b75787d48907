"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, 512 px, epsilon prediction."""

from __future__ import annotations

import copy
from typing import Any

from .base import ModelFamily, TextEncoder

CLIP_L = TextEncoder(folder="text_encoder", tokenizer_folder="tokenizer", layout="clip_l",
                     ldm_prefix="cond_stage_model.transformer.", lora_prefix="lora_te", pad_token="<|endoftext|>")

# Tiny test models: same structure as the real ones (so the single-file layout applies unchanged), two
# UNet levels of 32/64 channels, a four-level VAE (64 px images -> 8x8 latents), CLIP of width 32.
TINY_CLIP = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
             "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
             "pad_token_id": 1, "initializer_factor": 1.0, "projection_dim": 32}
TINY_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": [32, 64], "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
             "act_fn": "silu"}
TINY_VAE = {"sample_size": 64, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
            "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 32, "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "scaling_factor": 0.18215}


def tiny_sd1_configs() -> dict[str, dict[str, Any]]:
    unet = {**TINY_UNET, "cross_attention_dim": 32, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    text = {**TINY_CLIP, "num_hidden_layers": 3, "hidden_act": "quick_gelu"}
    return copy.deepcopy({"unet": unet, "vae": TINY_VAE, "text_encoder": text})


class StableDiffusion1(ModelFamily):
    def tiny_configs(self) -> dict[str, dict[str, Any]]:
        return tiny_sd1_configs()


# Activations: an SD1.5 LoRA at 512 px fits 6 GB only with gradient checkpointing.
SD1 = StableDiffusion1(name="sd1", architecture="sd1", label="SD 1.x", prediction_type="epsilon", resolution=512,
                       text_encoders=(CLIP_L,), pipeline_class="StableDiffusionPipeline",
                       lora_base_model_version="sd_v1", resolution_range=(256, 1024), activation_gib=3.0)
FAMILIES = (SD1,)
