"""Scaled-down random models of each family for tests and demos, with the real CLIP tokenizer.

Same structure as the real models (so the single-file key layout applies unchanged) but tiny:
two UNet levels of 32/64 channels, a four-level VAE (64 px images -> 8x8 latents, as SD's
factor 8), CLIP text encoders of width 32. Weights are random but never degenerate: tensors that
start all-zero or all-one (zero-initialised output convs, norms) get small random values, because
a freshly initialised CLIP makes A1111's prompt-emphasis rescale divide 0/0.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .components import PAD_TOKENS, Components, check_family, make_noise_scheduler
from .tokenizer import load_clip_tokenizer

_CLIP = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
         "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
         "pad_token_id": 1, "initializer_factor": 1.0, "projection_dim": 32}
_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
         "block_out_channels": [32, 64], "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
         "act_fn": "silu"}
_VAE = {"sample_size": 64, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 32, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.18215}
# SD2's OpenCLIP keeps one more transformer layer than diffusers uses (the penultimate layer's output
# conditions the UNet); the tiny file holds 3, the diffusers model 2.
_SD2_FILE_LAYERS = 3


def _sd1_configs() -> dict[str, dict[str, Any]]:
    unet = {**_UNET, "cross_attention_dim": 32, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    text = {**_CLIP, "num_hidden_layers": 3, "hidden_act": "quick_gelu"}
    return {"unet": unet, "vae": dict(_VAE), "text_encoder": text}


def _sd2_configs(sample_size: int) -> dict[str, dict[str, Any]]:
    configs = _sd1_configs()
    configs["unet"].update(attention_head_dim=[2, 4], use_linear_projection=True, sample_size=sample_size)
    configs["text_encoder"].update(num_hidden_layers=_SD2_FILE_LAYERS - 1, hidden_act="gelu")
    return configs


def _sdxl_configs() -> dict[str, dict[str, Any]]:
    unet = {**_UNET, "cross_attention_dim": 64, "attention_head_dim": [2, 4], "use_linear_projection": True,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8}
    vae = {**_VAE, "scaling_factor": 0.13025, "force_upcast": True}
    text = {**_CLIP, "num_hidden_layers": 2, "hidden_act": "quick_gelu"}
    text_2 = {**_CLIP, "num_hidden_layers": 3, "hidden_act": "gelu"}
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2}


def tiny_configs(family: str) -> dict[str, dict[str, Any]]:
    """Component configs (diffusers UNet/VAE, transformers CLIP text) of the tiny model of `family`."""
    builders = {"sd1": _sd1_configs, "sd2": lambda: _sd2_configs(8), "sd2v": lambda: _sd2_configs(12),
                "sdxl": _sdxl_configs}
    return copy.deepcopy(builders[check_family(family)]())


def build_models(configs: dict[str, dict[str, Any]]) -> tuple[Any, Any, list[Any]]:
    """UNet, VAE and text encoders with freshly initialised weights from component configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    encoders = [CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))]
    if "text_encoder_2" in configs:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])))
    return unet, vae, encoders


def perturb_degenerate(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    """Give every constant parameter (all zeros, all ones) small random deviations."""
    with torch.no_grad():
        for parameter in module.parameters():
            flat = parameter.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.copy_(flat[0] + scale * noise)


def _sd2_extras(hidden: int, inner: int, projection: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The OpenCLIP keys of an SD2 file that the diffusers text encoder does not hold."""
    prefix = f"cond_stage_model.model.transformer.resblocks.{_SD2_FILE_LAYERS - 1}."
    shapes = {"attn.in_proj_weight": (3 * hidden, hidden), "attn.in_proj_bias": (3 * hidden,),
              "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,),
              "ln_1.weight": (hidden,), "ln_1.bias": (hidden,), "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
              "mlp.c_fc.weight": (inner, hidden), "mlp.c_fc.bias": (inner,),
              "mlp.c_proj.weight": (hidden, inner), "mlp.c_proj.bias": (hidden,)}
    extras = {prefix + name: 0.02 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    extras["cond_stage_model.model.text_projection"] = 0.02 * torch.randn((hidden, projection), generator=generator)
    extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    return extras


def _sdxl_extras() -> dict[str, torch.Tensor]:
    return {"conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052)}


def tiny_components(family: str, seed: int = 0) -> Components:
    """A tiny random model of `family` ('sd1', 'sd2', 'sd2v', 'sdxl'), deterministic for a seed."""
    configs = tiny_configs(family)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, encoders = build_models(configs)
    for module in (unet, vae, *encoders):
        perturb_degenerate(module, generator)
        module.eval()
    extras: dict[str, torch.Tensor] = {}
    if family in ("sd2", "sd2v"):
        text = configs["text_encoder"]
        extras = _sd2_extras(text["hidden_size"], text["intermediate_size"], text["projection_dim"], generator)
    elif family == "sdxl":
        extras = _sdxl_extras()
    scheduler = make_noise_scheduler(family)
    return Components(family=family, unet=unet, vae=vae, text_encoders=encoders,
                      tokenizers=[load_clip_tokenizer(pad) for pad in PAD_TOKENS[family]],
                      noise_scheduler=scheduler, prediction_type=scheduler.config.prediction_type, extras=extras)
