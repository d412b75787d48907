"""The interface every model family implements, with the behaviour the Stable Diffusion UNet families share.

A family is one frozen `ModelFamily` value: its facts (prediction type, resolution, text encoders and
their key prefixes, pipeline class, host markers) as fields, its behaviour (text encoding, added
conditioning, sampling pipeline, export markers, tiny test configs) as methods a family's unit may
override. Nothing here imports torch or diffusers at import time, so the config schema can list the
families without them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import tables

if TYPE_CHECKING:
    import torch

    from .clip_text import EncodedText

CONFIG_DIR = Path(__file__).resolve().parent.parent / "resources" / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction")
# The DDPM training schedule all SD1/SD2/SDXL models share (ldm's 'linear' = diffusers' scaled_linear).
DDPM_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                 "steps_offset": 1, "timestep_spacing": "leading", "variance_type": "fixed_small"}
# Marker keys hosts read from a single file (Forge, reForge, SD.Next, ComfyUI): v-prediction, and sampling
# with the zero-terminal-SNR schedule. Both are empty tensors.
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
# The SAI model spec's (modelspec.prediction_type) names of the prediction types, as kohya writes them.
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}
SD_PIPELINE_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
SD_INDEX_OPTIONS = {"safety_checker": [None, None], "feature_extractor": [None, None],
                    "requires_safety_checker": False}


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: where it lives in a diffusers folder and in the single file.

    layout: 'clip_l' (transformers names under a prefix) or 'open_clip' (renamed, fused q/k/v).
    """

    folder: str            # diffusers subfolder and config name: 'text_encoder', 'text_encoder_2'
    tokenizer_folder: str  # 'tokenizer', 'tokenizer_2'
    layout: str
    ldm_prefix: str        # key prefix in the original single file
    lora_prefix: str       # kohya LoRA key prefix: 'lora_te', 'lora_te1', 'lora_te2'
    pad_token: str         # CLIP-L pads with the end token, OpenCLIP with '!' (id 0)
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's second: pooled output)

    @property
    def host_prefix(self) -> str:
        """Prefix of the host's (A1111 network) module names of this encoder, dotted."""
        return tables.host_text_prefix(self.ldm_prefix)

    @property
    def model_class(self) -> str:
        return "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"


@dataclass(frozen=True)
class ModelFamily:
    """One model family. `architecture` groups families that share weights' layout (sd2 and sd2v).

    The guide (memory estimate, presets, wizard, pre-flight) reads a family's sizes and limits from here:
    `resolution` (the native one), `resolution_range`, `pixel_multiple`, `activation_gib`, and the real
    parameter counts its shipped configs give (`parameter_counts`, `lora_parameters_per_rank`).
    """

    name: str
    architecture: str
    label: str
    prediction_type: str
    resolution: int
    text_encoders: tuple[TextEncoder, ...]
    pipeline_class: str
    lora_base_model_version: str  # ss_base_model_version, as kohya writes it
    pipeline_options: Mapping[str, Any] = field(default_factory=lambda: dict(SD_PIPELINE_OPTIONS))
    index_options: Mapping[str, Any] = field(default_factory=lambda: dict(SD_INDEX_OPTIONS))
    lora_unet_ldm_names: bool = False  # kohya's SDXL format: UNet LoRA keys by original names
    zero_terminal_snr: bool = False
    schedule_tables: bool = True  # the file carries ldm's schedule buffers (SD1/SD2 files do, SDXL's do not)
    v_yaml: str | None = None  # config (under resources/configs/) written beside a v-prediction export
    unet_class: str = "UNet2DConditionModel"
    vae_class: str = "AutoencoderKL"
    # --- sizes and limits the guide reads ---
    denoiser_folder: str = "unet"  # the trained denoiser's diffusers subfolder and shipped config name
    config_folder: str = ""  # shipped full-size configs under resources/configs/ (default: the name)
    resolution_range: tuple[int, int] = (256, 1024)  # training resolutions the model handles well
    pixel_multiple: int = 8  # image sides must be multiples of this (VAE downscale x patch size)
    # Activation memory of one training sample at `resolution` in 16-bit compute without gradient
    # checkpointing (SDPA attention), in GiB: calibrated on published numbers, see guide/memory.py.
    activation_gib: float = 3.0

    # --- detection ---------------------------------------------------------------------------------------

    def matches_keys(self, keys: Collection[str]) -> bool:
        """Whether a single file's keys hold this family's text encoders (UNet and VAE are checked by the registry)."""
        return all(any(key.startswith(encoder.ldm_prefix) for key in keys) for encoder in self.text_encoders)

    def matches_folder(self, index: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder (model_index.json, first text encoder's config) is of this architecture."""
        count = sum(1 for encoder in ("text_encoder", "text_encoder_2") if encoder in index)
        first = "clip_l" if text_config.get("hidden_act") == "quick_gelu" else "open_clip"
        return count == len(self.text_encoders) and self.text_encoders[0].layout == first

    # --- models and schedule -----------------------------------------------------------------------------

    @property
    def pad_tokens(self) -> list[str]:
        return [encoder.pad_token for encoder in self.text_encoders]

    def component_folders(self) -> tuple[str, ...]:
        """The model's components by diffusers subfolder: the denoiser, the VAE, the text encoders."""
        return (self.denoiser_folder, "vae", *(encoder.folder for encoder in self.text_encoders))

    def shipped_configs(self) -> dict[str, dict[str, Any]]:
        """The full-size component configs shipped for this family (resources/configs/<config_folder>/)."""
        import json

        folder = CONFIG_DIR / (self.config_folder or self.name)
        return {name: json.loads((folder / name / "config.json").read_text()) for name in self.component_folders()
                if (folder / name / "config.json").is_file()}

    def build_component(self, part: str, config: Mapping[str, Any]) -> torch.nn.Module:
        """One component (a `component_folders` name) with fresh weights from its config."""
        import diffusers
        import transformers

        if part in (self.denoiser_folder, "vae"):
            return getattr(diffusers, self.unet_class if part != "vae" else self.vae_class).from_config(dict(config))
        encoder = next(encoder for encoder in self.text_encoders if encoder.folder == part)
        model_class = getattr(transformers, encoder.model_class)
        return model_class(model_class.config_class.from_dict(dict(config)))

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each component of the real model, counted on meta tensors (folder -> count)."""
        from .sizes import parameter_counts

        return parameter_counts(self)

    def lora_parameters_per_rank(self) -> dict[str, int]:
        """LoRA parameters per unit of rank of the denoiser and each text encoder of the real model."""
        from .sizes import lora_parameters_per_rank

        return lora_parameters_per_rank(self)

    def lora_target_names(self, part: str, model: Any, with_conv: bool = False) -> list[str]:
        """The layers of a component a LoRA adapts (`with_conv`: LoCon's 3x3 convolutions of the denoiser)."""
        from .sizes import text_lora_targets, unet_lora_targets

        return unet_lora_targets(model, with_conv) if part == self.denoiser_folder else text_lora_targets(model)

    def scheduler_config(self, prediction_type: str | None = None,
                         zero_terminal_snr: bool | None = None) -> dict[str, Any]:
        """The DDPM training schedule; rescaled to zero terminal SNR (diffusers' rescale_betas_zero_snr)
        where the model uses it (default: the family's)."""
        rescale = self.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr
        return {**DDPM_SCHEDULE, "prediction_type": prediction_type or self.prediction_type,
                "rescale_betas_zero_snr": rescale}

    def make_noise_scheduler(self, prediction_type: str | None = None, zero_terminal_snr: bool | None = None) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config(prediction_type, zero_terminal_snr))

    def tokenizers(self) -> list[Any]:
        from ..models.tokenizer import load_clip_tokenizer

        return [load_clip_tokenizer(pad) for pad in self.pad_tokens]

    def config_defaults(self, prediction_type: str | None = None,
                        zero_terminal_snr: bool | None = None) -> dict[str, Any]:
        """Settings a new model of this family starts with (schema field -> value): the model's prediction
        type and schedule (default: the family's)."""
        return {"model_family": self.name, "prediction_type": prediction_type or self.prediction_type,
                "resolution": self.resolution,
                "zero_terminal_snr": self.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr}

    # --- text conditioning ---------------------------------------------------------------------------------

    def encode_text(self, text_encoders: list[Any], tokenizers: list[Any], captions: list[str], config: Any,
                    device: torch.device, warn: Callable[[str], None]) -> EncodedText:
        """Captions -> the UNet's encoder_hidden_states (SD1/SD2: last layer, or clip skip through the final norm)."""
        from .clip_text import encode_all, final_hidden

        return encode_all(text_encoders, tokenizers, captions, config, device, warn, final_hidden)

    def added_conditioning(self, encoded: EncodedText, items: list[Any], device: torch.device,
                           dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The UNet's added_cond_kwargs for a batch of BatchItems (None: the family has none)."""
        return None

    # --- diffusers folder and sampling -----------------------------------------------------------------

    def model_index(self, scheduler_class: str, encoder_classes: list[str], diffusers_version: str) -> dict[str, Any]:
        """model_index.json of a working folder (no safety checker: A1111 does not use one either)."""
        index: dict[str, Any] = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers_version,
                                 "unet": ["diffusers", self.unet_class], "vae": ["diffusers", self.vae_class],
                                 "scheduler": ["diffusers", scheduler_class]}
        for encoder, cls in zip(self.text_encoders, encoder_classes, strict=True):
            index[encoder.folder] = ["transformers", cls]
            index[encoder.tokenizer_folder] = ["transformers", "CLIPTokenizer"]
        return {**index, **self.index_options}

    def build_pipeline(self, components: Any, scheduler: Any) -> Any:
        """A diffusers text-to-image pipeline over the components (shared, not copied)."""
        import diffusers

        parts: dict[str, Any] = {}
        pairs = zip(self.text_encoders, components.text_encoders, components.tokenizers, strict=True)
        for encoder, model, tokenizer in pairs:
            parts[encoder.folder], parts[encoder.tokenizer_folder] = model, tokenizer
        return getattr(diffusers, self.pipeline_class)(vae=components.vae, unet=components.unet, scheduler=scheduler,
                                                       **parts, **self.pipeline_options)

    # --- export: the names tables and what hosts detect ----------------------------------------------------

    def unet_table(self, config: Mapping[str, Any]) -> tables.BlockTable:
        """diffusers UNet module prefix -> original name under `model.diffusion_model.`."""
        return tables.unet_table(config)

    def vae_table(self, config: Mapping[str, Any]) -> tables.BlockTable:
        return tables.vae_table(config)

    def marker_tensors(self, prediction_type: str, zero_terminal_snr: bool = False) -> dict[str, torch.Tensor]:
        """Keys added to an exported single file so hosts detect the model's variant: the empty `ztsnr` key
        Forge, reForge, SD.Next and ComfyUI read as 'sample with the zero-terminal-SNR schedule'."""
        import torch

        return {ZTSNR_KEY: torch.tensor([])} if zero_terminal_snr else {}

    def side_files(self, prediction_type: str) -> dict[str, str]:
        """Files written beside an export (suffix -> text): A1111 reads SD2-v's yaml."""
        if self.v_yaml and prediction_type == "v_prediction":
            return {".yaml": (CONFIG_DIR / self.v_yaml).read_text(encoding="utf-8")}
        return {}

    def lora_markers(self, prediction_type: str | None = None,
                     zero_terminal_snr: bool | None = None) -> dict[str, str]:
        """LoRA metadata hosts and model browsers read the base model and its objective from: kohya's ss_*
        fields and the SAI model spec's prediction type (default: the family's)."""
        prediction = prediction_type or self.prediction_type
        rescaled = self.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr
        return {"ss_base_model_version": self.lora_base_model_version,
                "ss_v2": str(self.architecture == "sd2"),
                "ss_v_parameterization": str(prediction == "v_prediction"),
                "ss_zero_terminal_snr": str(rescaled),
                "modelspec.prediction_type": MODELSPEC_PREDICTION[prediction]}

    # --- tiny models for tests and demos ----------------------------------------------------------------

    def tiny_configs(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError(f"{self.name} has no tiny configs")

    def tiny_extras(self, configs: Mapping[str, Mapping[str, Any]], generator: Any) -> dict[str, torch.Tensor]:
        """Keys of the family's single file that the diffusers models do not hold."""
        return {}
