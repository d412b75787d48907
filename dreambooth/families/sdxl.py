"""Stable Diffusion XL: CLIP ViT-L plus OpenCLIP ViT-bigG, 1024 px, added conditioning; sdxl = epsilon,
sdxlv = v-prediction with the zero-terminal-SNR schedule (NoobAI-XL and its derivatives).

The UNet is conditioned on both encoders' penultimate layers (concatenated), the second encoder's pooled
output and the size/crop `time_ids`. Both variants share the weights' layout; hosts tell them apart by
the empty `v_pred` and `ztsnr` keys in the file (Forge, reForge, SD.Next, ComfyUI) or a yaml beside it
whose denoiser scales for v (AUTOMATIC1111 1.10, Forge). Export writes all of them for v-prediction.
SDXL-derived checkpoints (Pony, Illustrious, NoobAI epsilon) are SDXL files and import as sdxl.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .base import V_PRED_KEY, ModelFamily, TextEncoder
from .sd1 import TINY_CLIP, TINY_UNET, TINY_VAE

if TYPE_CHECKING:
    import torch

    from .clip_text import EncodedText

CLIP_L = TextEncoder(folder="text_encoder", tokenizer_folder="tokenizer", layout="clip_l",
                     ldm_prefix="conditioner.embedders.0.transformer.", lora_prefix="lora_te1",
                     pad_token="<|endoftext|>")
OPEN_CLIP_G = TextEncoder(folder="text_encoder_2", tokenizer_folder="tokenizer_2", layout="open_clip",
                          ldm_prefix="conditioner.embedders.1.model.", lora_prefix="lora_te2", pad_token="!",
                          with_projection=True)
V_YAML = "sdxl/sd_xl_v.yaml"


def time_ids(item: Any) -> list[float]:
    """SDXL's size conditioning of a BatchItem: original size, crop top-left, target size (all height first)."""
    width, height = item.bucket
    original_w, original_h = item.record.size
    crop_x, crop_y = getattr(item, "crop", (0, 0)) or (0, 0)
    return [float(original_h), float(original_w), float(crop_y), float(crop_x), float(height), float(width)]


class StableDiffusionXL(ModelFamily):
    def encode_text(self, text_encoders: list[Any], tokenizers: list[Any], captions: list[str], config: Any,
                    device: torch.device, warn: Callable[[str], None]) -> EncodedText:
        """Both encoders' penultimate layers concatenated, and the second's pooled output."""
        from .clip_text import encode_all, penultimate_hidden

        return encode_all(text_encoders, tokenizers, captions, config, device, warn, penultimate_hidden)

    def added_conditioning(self, encoded: EncodedText, items: list[Any], device: torch.device,
                           dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        import torch

        ids = torch.tensor([time_ids(item) for item in items], device=device, dtype=dtype)
        return {"text_embeds": encoded.pooled, "time_ids": ids}

    def marker_tensors(self, prediction_type: str, zero_terminal_snr: bool = False) -> dict[str, torch.Tensor]:
        import torch

        markers = super().marker_tensors(prediction_type, zero_terminal_snr)
        return {V_PRED_KEY: torch.tensor([]), **markers} if prediction_type == "v_prediction" else markers

    def tiny_configs(self) -> dict[str, dict[str, Any]]:
        unet = {**TINY_UNET, "cross_attention_dim": 64, "attention_head_dim": [2, 4], "use_linear_projection": True,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
                "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 32 + 6 * 8}
        vae = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
        text = {**TINY_CLIP, "num_hidden_layers": 2, "hidden_act": "quick_gelu"}
        text_2 = {**TINY_CLIP, "num_hidden_layers": 3, "hidden_act": "gelu"}
        return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2}

    def tiny_extras(self, configs: Mapping[str, Mapping[str, Any]], generator: Any) -> dict[str, Any]:
        import torch

        return {f"{OPEN_CLIP_G.ldm_prefix}logit_scale": torch.tensor(4.6052)}


# Hosts tell an SDXL LoRA by ss_base_model_version starting with 'sdxl_' (Forge, SD.Next), so both variants
# write kohya's SDXL value; ss_v_parameterization and modelspec.prediction_type tell the objective.
_COMMON: dict[str, Any] = {
    "architecture": "sdxl", "resolution": 1024, "text_encoders": (CLIP_L, OPEN_CLIP_G),
    "pipeline_class": "StableDiffusionXLPipeline", "lora_base_model_version": "sdxl_base_v1-0",
    "lora_unet_ldm_names": True, "schedule_tables": False, "v_yaml": V_YAML,
    "pipeline_options": {"force_zeros_for_empty_prompt": True},
    "index_options": {"force_zeros_for_empty_prompt": True},
    "config_folder": "sdxl", "resolution_range": (512, 2048),
    # SDXL LoRA at 1024 px needs about 24 GB without gradient checkpointing and about 12 GB with it.
    "activation_gib": 10.0,
}
SDXL = StableDiffusionXL(name="sdxl", label="SDXL", prediction_type="epsilon", **_COMMON)
SDXLV = StableDiffusionXL(name="sdxlv", label="SDXL v-prediction, zero-terminal SNR", prediction_type="v_prediction",
                          zero_terminal_snr=True, **_COMMON)
FAMILIES = (SDXL, SDXLV)
