"""Stable Diffusion 3 and 3.5 (SD3 Medium, SD 3.5 Medium and Large): an MMDiT transformer trained by flow matching.

Three text encoders: CLIP-L and CLIP-G (penultimate layers, concatenated and zero-padded to T5's width; both
pooled outputs concatenated) and the optional T5-XXL (its tokens follow CLIP's; without it the reference
pipeline feeds zeros of T5's shape, and so does training). SD 3.5 Medium's dual-attention blocks and SD 3.5's
q/k norms are whatever the transformer config says: one family covers the three releases.

Single files keep every text encoder in transformers' names under `text_encoders.<clip_l|clip_g|t5xxl>.transformer.`
and the transformer under `model.diffusion_model.` in the MMDiT layout, which `mmdit_table` derives from
diffusers' converter. SD3's CLIP-L carries no text projection in those files (diffusers substitutes the
identity); it is neither trained nor exported. LoRA files name the transformer's modules as diffusers does
(`transformer.transformer_blocks.N.attn.to_q.lora_down.weight`) with the strength folded into the up weights
and no `.alpha` keys: A1111 1.10 splits every SD3 LoRA key at its last two dots and fails on a one-dot alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import CONFIG_DIR, ModelFamily, TextEncoder
from .sd1 import TINY_CLIP, TINY_VAE

if TYPE_CHECKING:
    import torch

    from .clip_text import EncodedText

CLIP_L = TextEncoder(folder="text_encoder", tokenizer_folder="tokenizer", layout="clip_l",
                     ldm_prefix="text_encoders.clip_l.transformer.", lora_prefix="lora_te1",
                     pad_token="<|endoftext|>", with_projection=True, identity_projection=True)
CLIP_G = TextEncoder(folder="text_encoder_2", tokenizer_folder="tokenizer_2", layout="clip_l",
                     ldm_prefix="text_encoders.clip_g.transformer.", lora_prefix="lora_te2", pad_token="!",
                     with_projection=True)
T5_XXL = TextEncoder(folder="text_encoder_3", tokenizer_folder="tokenizer_3", layout="t5",
                     ldm_prefix="text_encoders.t5xxl.transformer.", lora_prefix="lora_te3", pad_token="<pad>",
                     optional=True, trainable=False)
ORIGINAL = "model.diffusion_model."
JOINT_BLOCKS = ORIGINAL + "joint_blocks."
HEAD_WIDTH = 64   # every release's attention head width (ComfyUI assumes 64 per block as well)
DEFAULT_VARIANT = "sd3.5-medium"
T5_WIDTH = 4096   # T5-XXL's width: the transformer's joint attention width
T5_TOKENS = 256   # the diffusers pipeline's max_sequence_length for SD3
SHIFT = 3.0       # the SD3/SD 3.5 schedulers' timestep shift
# LoRA targets: the attention projections of both streams (and SD 3.5 Medium's second image attention),
# the layers diffusers' SD3 LoRA example trains.
ATTENTION_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                     "attn2.to_out.0")


def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The SD3Transformer2DModel config of a single file, read from its transformer's key shapes: SD3 Medium,
    SD 3.5 Medium (dual attention in its first blocks) and SD 3.5 Large differ only in what the keys show."""
    def shape(key: str) -> tuple[int, ...]:
        return tuple(shapes[ORIGINAL + key])

    blocks = {int(key.split(".")[3]) for key in shapes if key.startswith(JOINT_BLOCKS)}
    dual = sorted({int(key.split(".")[3]) for key in shapes if key.startswith(JOINT_BLOCKS) and ".attn2." in key})
    has_norm = any(key.startswith(JOINT_BLOCKS) and key.endswith("attn.ln_q.weight") for key in shapes)
    width, joint_width = shape("context_embedder.weight")
    patch = shape("x_embedder.proj.weight")
    qk_norm = None if not has_norm else "layer_norm" if any(key.endswith("ln_q.bias") for key in shapes) else "rms_norm"
    return {"_class_name": "SD3Transformer2DModel", "attention_head_dim": HEAD_WIDTH,
            "num_attention_heads": width // HEAD_WIDTH, "caption_projection_dim": width,
            "joint_attention_dim": joint_width, "num_layers": len(blocks), "in_channels": patch[1],
            "patch_size": patch[2], "out_channels": shape("final_layer.linear.weight")[0] // patch[2] ** 2,
            "pooled_projection_dim": shape("y_embedder.mlp.0.weight")[1],
            "pos_embed_max_size": math.isqrt(shape("pos_embed")[1]), "sample_size": 128,
            "dual_attention_layers": dual, "qk_norm": qk_norm}


class StableDiffusion3(ModelFamily):
    # --- detection and configs ---------------------------------------------------------------------------

    def matches_keys(self, keys: Any) -> bool:
        return any(key.startswith(JOINT_BLOCKS) for key in keys)

    def matches_folder(self, index: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        return list(index.get(self.denoiser_folder, [None, None]))[1] == self.denoiser_class

    def variant_configs(self) -> dict[str, dict[str, Any]]:
        """The shipped transformer configs of the releases: sd3-medium, sd3.5-medium, sd3.5-large."""
        import json

        folder = CONFIG_DIR / self.name / "variants"
        return {path.parent.parent.name: json.loads(path.read_text()) for path in folder.glob("*/transformer/config.json")}

    def shipped_configs(self) -> dict[str, dict[str, Any]]:
        """VAE and text encoders of every release, with SD 3.5 Medium's transformer."""
        return {**super().shipped_configs(), self.denoiser_folder: self.variant_configs()[DEFAULT_VARIANT]}

    def configs_for(self, state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        shapes = {key: tuple(value.shape) for key, value in state.items() if key.startswith(ORIGINAL)}
        return {**super().shipped_configs(), self.denoiser_folder: transformer_config(shapes)}

    # --- schedule and sampling ---------------------------------------------------------------------------

    def scheduler_config(self, prediction_type: str | None = None,
                         zero_terminal_snr: bool | None = None) -> dict[str, Any]:
        return {"num_train_timesteps": 1000, "shift": SHIFT}

    def sampling_scheduler(self, name: str, noise_scheduler_config: Mapping[str, Any], prediction_type: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name not in self.sample_schedulers:
            raise ConfigError(f"Setting 'sample_scheduler': {name!r} does not sample {self.label} models; use "
                              f"{' or '.join(self.sample_schedulers)}.")
        return FlowMatchEulerDiscreteScheduler.from_config(dict(noise_scheduler_config))

    # --- text conditioning and the transformer call --------------------------------------------------------

    def encode_text(self, text_encoders: list[Any], tokenizers: list[Any], captions: list[str], config: Any,
                    device: torch.device, warn: Callable[[str], None]) -> EncodedText:
        """CLIP-L and CLIP-G penultimate layers side by side, zero-padded to T5's width, then T5's tokens (zeros
        without T5); pooled: both CLIP pooled outputs."""
        import torch

        from .clip_text import EncodedText, batch_ids, encode_chunks, penultimate_hidden
        from .t5_text import encode_t5

        hiddens, pooled = [], []
        for encoder, tokenizer in zip(text_encoders[:2], tokenizers[:2], strict=True):
            ids = batch_ids(tokenizer, captions, config.max_token_length, config.pad_tokens, warn).to(device)
            hidden, pooled_output = encode_chunks(encoder, ids, config.clip_skip, penultimate_hidden)
            hiddens.append(hidden)
            pooled.append(pooled_output)
        clip = torch.nn.functional.pad(torch.cat(hiddens, dim=-1), (0, T5_WIDTH - sum(h.shape[-1] for h in hiddens)))
        if text_encoders[2] is None:
            t5 = torch.zeros(len(captions), T5_TOKENS, T5_WIDTH, device=device, dtype=clip.dtype)
        else:
            t5 = encode_t5(text_encoders[2], tokenizers[2], captions, T5_TOKENS, device, warn).to(clip.dtype)
        return EncodedText(torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1))

    def predict(self, denoiser: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoded: EncodedText,
                items: list[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return denoiser(hidden_states=noisy_latents, encoder_hidden_states=encoded.hidden,
                        pooled_projections=encoded.pooled, timestep=timesteps, return_dict=False)[0]

    # --- export and LoRA -----------------------------------------------------------------------------------

    def denoiser_to_original(self, state_dict: Mapping[str, torch.Tensor],
                             config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from .mmdit_table import to_original

        return to_original(state_dict, config)

    def check_lora_settings(self, config: Any) -> None:
        if config.lora_conv_rank > 0:
            raise ConfigError(f"Setting 'lora_conv_rank' does not apply to {self.label}: its transformer has no "
                              "3x3 convolutions for LoCon; set it to 0.")
        if config.use_dora:
            raise ConfigError(f"Setting 'use_dora' is not available for {self.label}: its LoRA loaders (A1111 1.10, "
                              "ComfyUI, SD.Next) share no DoRA form; turn it off.")

    def denoiser_lora_targets(self, denoiser: Any, with_conv: bool) -> list[str] | None:
        import torch

        return [name for name, module in denoiser.named_modules()
                if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.")
                and name.split(".", 2)[2] in ATTENTION_TARGETS]

    def denoiser_lora_tensors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], denoiser: Any,
                              key_format: str) -> dict[str, torch.Tensor] | None:
        """original: the MMDiT's module names, q/k/v fused (what A1111 1.10, Forge and ComfyUI all map);
        diffusers: `transformer.<diffusers module>` (SD.Next, ComfyUI). No alpha either way."""
        from .mmdit_table import original_lora

        if key_format == "original":
            return original_lora(factors, denoiser)
        tensors = {}
        for name, (down, up) in factors.items():
            tensors.update({f"transformer.{name}.lora_down.weight": down, f"transformer.{name}.lora_up.weight": up})
        return tensors

    def lora_markers(self, prediction_type: str | None = None,
                     zero_terminal_snr: bool | None = None) -> dict[str, str]:
        return {"ss_base_model_version": self.lora_base_model_version, "ss_v2": "False"}

    # --- tiny models -------------------------------------------------------------------------------------

    def tiny_configs(self) -> dict[str, dict[str, Any]]:
        """Two joint blocks (the first with SD 3.5 Medium's second attention, q/k RMS norms), 2 heads of 64 (the
        width ComfyUI assumes, 64 per block), T5-XXL's width where the text meets the transformer."""
        transformer = {"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                       "attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": T5_WIDTH,
                       "caption_projection_dim": 128, "pooled_projection_dim": 80, "pos_embed_max_size": 32,
                       "dual_attention_layers": [0], "qk_norm": "rms_norm"}
        vae = {**TINY_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
               "use_quant_conv": False, "use_post_quant_conv": False}
        clip_l = {**TINY_CLIP, "num_hidden_layers": 2, "hidden_act": "quick_gelu"}
        # CLIP-G wider than CLIP-L, as in the real models: separate files are told apart by their width.
        clip_g = {**TINY_CLIP, "num_hidden_layers": 3, "hidden_act": "gelu", "hidden_size": 48, "intermediate_size": 96,
                  "projection_dim": 48}
        t5 = {"vocab_size": 160, "d_model": T5_WIDTH, "d_kv": 8, "d_ff": 16, "num_layers": 1, "num_heads": 2,
              "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
              "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False,
              "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
              "tie_word_embeddings": False}
        return {"transformer": transformer, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g,
                "text_encoder_3": t5}

    def tiny_tokenizers(self) -> list[Any]:
        """The real CLIP tokenizers and a tiny SentencePiece T5 tokenizer trained once in the temp folder (None
        without the sentencepiece package: the tiny model then has no T5)."""
        import tempfile
        from pathlib import Path

        from ..models.tiny import tiny_t5_tokenizer_dir

        folder = tiny_t5_tokenizer_dir(Path(tempfile.gettempdir()) / "dreambooth-tiny-t5" / T5_XXL.tokenizer_folder)
        return self.tokenizers(folder.parent if folder is not None else None)


SD3 = StableDiffusion3(name="sd3", architecture="sd3", label="SD3 / SD 3.5", prediction_type="flow_matching",
                       resolution=1024, text_encoders=(CLIP_L, CLIP_G, T5_XXL),
                       pipeline_class="StableDiffusion3Pipeline", lora_base_model_version="sd3",
                       pipeline_options={}, index_options={}, schedule_tables=False,
                       denoiser_class="SD3Transformer2DModel", denoiser_folder="transformer",
                       scheduler_class="FlowMatchEulerDiscreteScheduler", sample_schedulers=("euler",),
                       lora_alpha_keys=False, pixel_multiple=16, resolution_range=(512, 1536),
                       # Not calibrated on a GPU: 4096 image tokens plus 333 text tokens through 24 joint blocks.
                       activation_gib=8.0)
FAMILIES = (SD3,)
