"""How Flux.1's transformer is fed, as diffusers' FluxPipeline feeds it: captions, packed latents, position ids,
the resolution-dependent shift, guidance, and the preview sampler.

* Captions: CLIP-L's pooled output (77 tokens, padded) conditions the modulation; T5-XXL's last hidden state
  (padded to 512 tokens for dev, 256 for schnell) is the token sequence.
* Latents: the VAE's 16 channels at 1/8 size, normalised with the VAE's shift and scale, are packed into 2x2
  patches (64 features per token); each token's position id is (0, row, column); text tokens' ids are 0.
* The transformer takes the noise level t in [0, 1] (FluxPipeline divides the scheduler's t x 1000 by 1000)
  and, for dev, the distilled guidance scale.
* dev samples with a shift that grows with the image's token count: mu rises linearly from `base_shift` at
  `base_image_seq_len` tokens to `max_shift` at `max_image_seq_len`, and the shift is e^mu (the scheduler's
  exponential time shift with sigma 1 equals t' = s t / (1 + (s - 1) t) with s = e^mu).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import ConfigError
from .clip_text import EncodedText

CLIP_TOKENS = 77
# Guidance the dev transformer is trained with (the distilled-guidance input): the value of diffusers' Flux
# DreamBooth LoRA script and of kohya's sd-scripts (3.5).
TRAIN_GUIDANCE = 3.5


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def clip_pooled(encoder: Any, tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """CLIP-L's pooled output of each caption (cut to 77 tokens), as FluxPipeline computes it."""
    ids = tokenizer(captions, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                    return_tensors="pt").input_ids.to(_device_of(encoder))
    return encoder(ids, output_hidden_states=False).pooler_output


def encode_captions(encoders: list[Any], tokenizers: list[Any], captions: list[str], t5_tokens: int,
                    device: torch.device, warn: Callable[[str], None]) -> EncodedText:
    """T5's tokens and CLIP-L's pooled output on `device`; each encoder runs where it is (T5 may have left the
    device once the captions were cached)."""
    from .t5_text import encode_t5

    hidden = encode_t5(encoders[1], tokenizers[1], captions, t5_tokens, _device_of(encoders[1]), warn)
    return EncodedText(hidden.to(device), clip_pooled(encoders[0], tokenizers[0], captions).to(device))


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(height/2 x width/2, 3) position ids of the packed latent tokens: (0, row, column).

    Written here because FluxPipeline._prepare_latent_image_ids changed its arguments between diffusers 0.31
    (latent size) and later releases (packed size)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    columns = torch.arange(width // 2, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=1)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 x W/2, 4C) tokens: each 2x2 patch one token, channels first within it.

    The layout of FluxPipeline._pack_latents; written here because the pipeline's unpacking helper changed what
    its size arguments mean after diffusers 0.31."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for (height, width) latents."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def transformer_output(transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, encoded: EncodedText,
                       guidance: float | None, dtype: torch.dtype) -> torch.Tensor:
    """The transformer's velocity for (B, C, H, W) noisy latents at noise levels `sigmas` (B,)."""
    batch, _, height, width = noisy.shape
    device = noisy.device
    text_ids = torch.zeros(encoded.hidden.shape[1], 3, device=device, dtype=dtype)
    guidance_tensor = None if guidance is None else torch.full((batch,), guidance, device=device, dtype=torch.float32)
    out = transformer(hidden_states=pack(noisy).to(dtype), timestep=sigmas.to(dtype), guidance=guidance_tensor,
                      pooled_projections=encoded.pooled, encoder_hidden_states=encoded.hidden, txt_ids=text_ids,
                      img_ids=image_ids(height, width, device, dtype), return_dict=False)[0]
    return unpack(out, height, width)


def resolution_shift(latent_height: int, latent_width: int, scheduler_config: Mapping[str, Any]) -> float:
    """e^mu for an image of this latent size, mu as FluxPipeline computes it for the scheduler (dev)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (latent_height // 2) * (latent_width // 2)
    mu = calculate_shift(tokens, scheduler_config["base_image_seq_len"], scheduler_config["max_image_seq_len"],
                         scheduler_config["base_shift"], scheduler_config["max_shift"])
    return math.exp(mu)


# Activations an autograd pass keeps per token, in multiples of the width, without checkpointing: a double-stream
# block per stream (modulated norm 2, q/k/v 3, attention 1, projection 1, MLP in 1, hidden 4 before and after
# the GELU 8 ... about 14 with the LoRA inputs), a single-stream block (norm 1, fused q/k/v/MLP 7, GELU 4, joined
# 5, attention 1: about 18). Checkpointing keeps each block's input (1) and one block's full set.
DOUBLE_BLOCK_ACTIVATIONS = 14
SINGLE_BLOCK_ACTIVATIONS = 18


@functools.cache
def memory_facts(family: str, t5_tokens: int) -> dict[str, Any]:
    """guide/memory.FamilyFacts of the released model, counted on meta tensors from the shipped configs; the
    activations for one 1024 px sample (4096 image tokens and the T5 tokens) at 2 bytes per value."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from . import flux_names, get_family

    configs = get_family(family).shipped_configs()
    with init_empty_weights():
        transformer = diffusers.FluxTransformer2DModel.from_config(configs["transformer"])
        vae = diffusers.AutoencoderKL.from_config(configs["vae"])
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(configs["text_encoder"]))
        t5 = transformers.T5EncoderModel(transformers.T5Config.from_dict(configs["text_encoder_2"]))
    width, tokens = flux_names.inner_dim(transformer.config), 4096 + t5_tokens
    doubles, singles = transformer.config.num_layers, transformer.config.num_single_layers
    per_token = doubles * DOUBLE_BLOCK_ACTIVATIONS + singles * SINGLE_BLOCK_ACTIVATIONS
    kept = doubles + singles + SINGLE_BLOCK_ACTIVATIONS
    return {"params": {"unet": _count(transformer), "te": _count(clip), "te2": _count(t5), "vae": _count(vae)},
            "lora_denoiser": _lora_width(transformer, flux_names.lora_target_names(transformer)),
            "lora_text": _lora_width(clip, [name for name, module in clip.named_modules()
                                            if isinstance(module, torch.nn.Linear) and ".layers." in name]),
            "activation_bytes": 2.0 * width * tokens * per_token, "resolution": 1024,
            "checkpointing_factor": kept / per_token}


def _count(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def _lora_width(model: torch.nn.Module, names: list[str]) -> int:
    """LoRA parameters per unit of rank: in + out features of each adapted linear layer."""
    return sum(model.get_submodule(name).in_features + model.get_submodule(name).out_features for name in names)


class FluxSampler:
    """FluxPipeline behind the preview renderer's call. The captions are encoded as in training (each encoder where
    it is) and handed over as embeddings; no negative prompt (Flux.1 is guidance-distilled); guidance goes to the
    transformer only where it has a guidance input (dev)."""

    def __init__(self, pipeline: Any, encoders: list[Any], tokenizers: list[Any], t5_tokens: int):
        self.pipeline = pipeline
        self.encoders = encoders
        self.tokenizers = tokenizers
        self.t5_tokens = t5_tokens

    def set_progress_bar_config(self, **options: Any) -> None:
        self.pipeline.set_progress_bar_config(**options)

    def __call__(self, *, prompt: str, negative_prompt: str | None, guidance_scale: float, **options: Any) -> Any:
        if negative_prompt:
            raise ConfigError(f"Sample negative prompt {negative_prompt!r}: Flux.1 samples without negative prompts "
                              "(its guidance is distilled into the model); clear 'sample_negative_prompt' or the "
                              "--n flag of 'sample_prompts'.")
        transformer = self.pipeline.transformer
        encoded = encode_captions(self.encoders, self.tokenizers, [prompt], self.t5_tokens,
                                  _device_of(transformer), lambda message: None)
        return self.pipeline(prompt_embeds=encoded.hidden.to(transformer.dtype),
                             pooled_prompt_embeds=encoded.pooled.to(transformer.dtype), guidance_scale=guidance_scale,
                             **options)
