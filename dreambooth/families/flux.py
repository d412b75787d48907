"""Flux.1 dev and schnell (Black Forest Labs): a 12-billion-parameter rectified-flow transformer conditioned on
CLIP-L's pooled output and T5-XXL's tokens, with a 16-channel VAE whose latents are packed into 2x2 patches.

dev is guidance-distilled (the transformer takes the guidance scale as an input) and samples with a shift that
grows with the image size; schnell is timestep-distilled (no guidance input, no shift, 1-4 steps). Both train
here as LoRAs on the transformer (optionally on CLIP-L; T5-XXL never trains), in kohya's key format that Forge,
ComfyUI and diffusers load (`flux_names`), from the files Forge users keep (`models/flux_files.py`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from . import flux_names
from .base import CONFIG_DIR, ModelFamily, TextEncoder
from .sd1 import TINY_CLIP, TINY_VAE
from .tables import Slot

if TYPE_CHECKING:
    import torch

    from .clip_text import EncodedText

CLIP_L = TextEncoder(folder="text_encoder", tokenizer_folder="tokenizer", layout="clip_l",
                     ldm_prefix="text_encoders.clip_l.transformer.", lora_prefix="lora_te1", pad_token="<|endoftext|>")
T5_XXL = TextEncoder(folder="text_encoder_2", tokenizer_folder="tokenizer_2", layout="t5",
                     ldm_prefix="text_encoders.t5xxl.transformer.", lora_prefix="lora_te2", pad_token="<pad>",
                     trainable=False)

# Tiny test models: the real structure at width 16 (2 heads of 8), 2 double and 2 single blocks, a 4-channel VAE
# (16 features per packed token), CLIP-L and T5 of width 32.
TINY_TRANSFORMER = {"attention_head_dim": 8, "num_attention_heads": 2, "num_layers": 2, "num_single_layers": 2,
                    "in_channels": 16, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                    "axes_dims_rope": [2, 2, 4], "patch_size": 1}
TINY_T5 = {"vocab_size": 256, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu",
           "is_encoder_decoder": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


class Flux(ModelFamily):
    """One Flux.1 variant; `t5_tokens` is the T5 length its pipeline reads (dev 512, schnell 256)."""

    # --- detection ---------------------------------------------------------------------------------------

    def matches_keys(self, keys: Any) -> bool:
        """A Flux transformer's keys (either layout, any prefix); dev's have the guidance embedding."""
        keys = list(keys)
        if not any(key.endswith(flux_names.FLUX_MARKERS) for key in keys):
            return False
        has_guidance = any(key.endswith(flux_names.GUIDANCE_MARKERS) for key in keys)
        return has_guidance == self.guidance

    def matches_folder(self, index: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        """Flux folders are read by models/flux_loading (the variant is in the transformer's config)."""
        return False

    @property
    def guidance(self) -> bool:
        return self.name == "flux-dev"

    @property
    def t5_tokens(self) -> int:
        return 512 if self.guidance else 256

    # --- models and schedule -----------------------------------------------------------------------------

    def scheduler_config(self, prediction_type: str | None = None,
                         zero_terminal_snr: bool | None = None) -> dict[str, Any]:
        config = json.loads((CONFIG_DIR / self.name / "scheduler" / "scheduler_config.json").read_text())
        return {key: value for key, value in config.items() if not key.startswith("_")}

    def config_defaults(self, prediction_type: str | None = None,
                        zero_terminal_snr: bool | None = None) -> dict[str, Any]:
        defaults = {**super().config_defaults(prediction_type, zero_terminal_snr), "method": "lora"}
        if self.guidance:
            return {**defaults, "flow_resolution_shift": True}
        return {**defaults, "flow_shift": 1.0}

    def check_config(self, config: Any) -> None:
        """Flux trains as a LoRA here: the full transformer (12 B parameters) with its optimizer state fits no
        consumer GPU, and its single-file export for Forge is not written."""
        if config.method != "lora":
            raise ConfigError(f"Setting 'method': {config.method} is not available for {self.label}; Flux trains "
                              "as a LoRA here: set 'method' to lora.")

    def check_lora_settings(self, config: Any) -> None:
        if config.use_dora and config.lora_key_format == "diffusers":
            raise ConfigError("Setting 'use_dora' with 'lora_key_format' diffusers: a Flux DoRA is written as exact "
                              "weight differences on the fused layers, which only the original format holds; set "
                              "'lora_key_format' to original.")

    def flow_shift(self, config: Any, latent_shape: tuple[int, ...], scheduler_config: Mapping[str, Any]) -> float:
        if getattr(config, "flow_resolution_shift", False):
            from .flux_model import resolution_shift

            return resolution_shift(latent_shape[-2], latent_shape[-1], scheduler_config)
        return float(config.flow_shift)

    # --- text conditioning ---------------------------------------------------------------------------------

    def encode_text(self, text_encoders: list[Any], tokenizers: list[Any], captions: list[str], config: Any,
                    device: torch.device, warn: Callable[[str], None]) -> EncodedText:
        from .flux_model import encode_captions

        return encode_captions(text_encoders, tokenizers, captions, self.t5_tokens, device, warn)

    def predict(self, denoiser: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoded: EncodedText,
                items: list[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        from .flux_model import TRAIN_GUIDANCE, transformer_output

        sigmas = timesteps / 1000.0  # the objective's t x 1000, as FluxPipeline divides it
        return transformer_output(denoiser, noisy_latents, sigmas, encoded, TRAIN_GUIDANCE if self.guidance else None,
                                  dtype)

    # --- sampling ------------------------------------------------------------------------------------------

    def build_pipeline(self, components: Any, scheduler: Any) -> Any:
        import diffusers

        from .flux_model import FluxSampler

        # The sampler encodes the prompts itself (as training does), so the pipeline holds no text encoder: its
        # device is the transformer's even when T5 waits in CPU memory.
        pipeline = diffusers.FluxPipeline(transformer=components.denoiser, vae=components.vae, scheduler=scheduler,
                                          text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        return FluxSampler(pipeline, list(components.text_encoders), list(components.tokenizers), self.t5_tokens)

    def sampling_scheduler(self, name: str, noise_scheduler_config: Mapping[str, Any], prediction_type: str) -> Any:
        import diffusers

        if name not in self.sample_schedulers:
            raise ConfigError(f"Setting 'sample_scheduler': {name!r} does not sample {self.label} models; use "
                              f"{' or '.join(self.sample_schedulers)}.")
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config())

    # --- export: names and markers ---------------------------------------------------------------------------

    def denoiser_to_original(self, state_dict: Mapping[str, torch.Tensor],
                             config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {f"model.diffusion_model.{key}": value
                for key, value in flux_names.to_original(state_dict, config).items()}

    def denoiser_lora_targets(self, denoiser: Any, with_conv: bool) -> list[str] | None:
        if with_conv:
            raise ConfigError(f"Setting 'lora_conv_rank': {self.label} has no convolutions to adapt (LoCon); set "
                              "it to 0.")
        return flux_names.lora_target_names(denoiser)

    def denoiser_lora_slots(self, denoiser: Any) -> Mapping[str, Slot] | None:
        """kohya's keys name the original layers: an adapter on to_q lands in the rows of the fused qkv."""
        return {name: dataclasses.replace(slot, original=flux_names.lora_key(slot.original))
                for name, slot in flux_names.module_table(denoiser.config).items()}

    def denoiser_lora_tensors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], denoiser: Any,
                              key_format: str) -> dict[str, torch.Tensor] | None:
        """'lora_key_format' diffusers: `transformer.<diffusers module>.lora_A/lora_B` with the strength in B (the
        peft names diffusers writes; Forge and ComfyUI map them onto the fused layers' rows). original: None, the
        fused kohya keys of denoiser_lora_slots."""
        if key_format != "diffusers":
            return None
        tensors: dict[str, torch.Tensor] = {}
        for name, (down, up) in factors.items():
            tensors.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
        return tensors

    def lora_markers(self, prediction_type: str | None = None,
                     zero_terminal_snr: bool | None = None) -> dict[str, str]:
        """What kohya's sd-scripts write for a Flux LoRA (model browsers and Forge read the base model here)."""
        return {"ss_base_model_version": self.lora_base_model_version, "ss_network_module": "networks.lora_flux",
                "modelspec.architecture": f"{self.name.replace('flux-', 'flux-1-')}/lora",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux"}

    # --- tiny models -----------------------------------------------------------------------------------------

    def tiny_configs(self) -> dict[str, dict[str, Any]]:
        vae = {**TINY_VAE, "latent_channels": 4, "scaling_factor": 0.3611, "shift_factor": 0.1159,
               "use_quant_conv": False, "use_post_quant_conv": False}
        clip = {**TINY_CLIP, "num_hidden_layers": 2, "hidden_act": "quick_gelu"}
        return {"transformer": {**TINY_TRANSFORMER, "guidance_embeds": self.guidance}, "vae": vae,
                "text_encoder": clip, "text_encoder_2": dict(TINY_T5)}

    def tiny_tokenizers(self) -> list[Any]:
        from ..models.tiny import tiny_t5_tokenizer

        return [self.tokenizers()[0], tiny_t5_tokenizer()]


_COMMON: dict[str, Any] = {
    "prediction_type": "flow_matching", "resolution": 1024,
    "text_encoders": (CLIP_L, T5_XXL), "pipeline_class": "FluxPipeline", "lora_base_model_version": "flux1",
    "pipeline_options": {}, "index_options": {}, "schedule_tables": False,
    "denoiser_class": "FluxTransformer2DModel", "denoiser_folder": "transformer",
    "scheduler_class": "FlowMatchEulerDiscreteScheduler", "sample_schedulers": ("euler",), "quantized_presets": True,
    "pixel_multiple": 16, "resolution_range": (512, 1536),
    # Checkpointing keeps each of the 57 blocks' inputs and one block's activations: 3 of 38 per-token widths.
    "checkpointing_factor": 3 / 38}
# Activations of one 1024 px sample in 16-bit compute without checkpointing, GiB: flux_model.memory_facts counts them
# from the released shapes (4096 image tokens plus dev's 512 or schnell's 256 T5 tokens); a test keeps them equal.
# Each variant is its own architecture: their files differ (dev's guidance embedding), and detection tells them apart.
FLUX_DEV = Flux(name="flux-dev", architecture="flux-dev", label="Flux.1 dev", activation_gib=25.05, **_COMMON)
FLUX_SCHNELL = Flux(name="flux-schnell", architecture="flux-schnell", label="Flux.1 schnell", activation_gib=23.66,
                    **_COMMON)
FAMILIES = (FLUX_DEV, FLUX_SCHNELL)
