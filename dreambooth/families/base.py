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

from ..errors import ConfigError
from . import tables

if TYPE_CHECKING:
    import torch

    from .clip_text import EncodedText

CONFIG_DIR = Path(__file__).resolve().parent.parent / "resources" / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_matching")
# The trained diffusion model's part name in snapshots, optimizer groups, logs and LoRA state, whatever its
# class (a UNet or a transformer): existing snapshots and logs name it so.
DENOISER_PART = "unet"
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

    layout: 'clip_l' (transformers names under a prefix), 'open_clip' (renamed, fused q/k/v) or 't5'
    (a T5 encoder: transformers names under a prefix, SentencePiece tokenizer).
    optional: the model works without it (SD3's T5: zeros stand in for its output, as the reference
    pipeline does); Components hold None for an absent optional encoder.
    trainable: whether 'train_text_encoder' trains it (T5-XXL's 4.7 B parameters never train here).
    identity_projection: the single file has no text projection and the diffusers model an identity one (SD3's
    CLIP-L, whose hosts use the unprojected pooled output): it is filled in on import, kept frozen, not exported.
    """

    folder: str            # diffusers subfolder and config name: 'text_encoder', 'text_encoder_2'
    tokenizer_folder: str  # 'tokenizer', 'tokenizer_2'
    layout: str
    ldm_prefix: str        # key prefix in the original single file
    lora_prefix: str       # kohya LoRA key prefix: 'lora_te', 'lora_te1', 'lora_te2'
    pad_token: str         # CLIP-L pads with the end token, OpenCLIP with '!' (id 0)
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's second: pooled output)
    optional: bool = False
    trainable: bool = True
    identity_projection: bool = False

    @property
    def host_prefix(self) -> str:
        """Prefix of the host's (A1111 network) module names of this encoder, dotted."""
        return tables.host_text_prefix(self.ldm_prefix)

    @property
    def model_class(self) -> str:
        if self.layout == "t5":
            return "T5EncoderModel"
        return "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"

    @property
    def tokenizer_class(self) -> str:
        return "T5TokenizerFast" if self.layout == "t5" else "CLIPTokenizer"


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
    lora_alpha_keys: bool = True  # LoRA files carry `.alpha`; False: the strength is folded into the up weights
    zero_terminal_snr: bool = False
    schedule_tables: bool = True  # the file carries ldm's schedule buffers (SD1/SD2 files do, SDXL's do not)
    v_yaml: str | None = None  # config (under resources/configs/) written beside a v-prediction export
    denoiser_class: str = "UNet2DConditionModel"  # the trained diffusion model's diffusers class
    denoiser_folder: str = "unet"                 # its diffusers subfolder and pipeline argument
    vae_class: str = "AutoencoderKL"
    scheduler_class: str = "DDPMScheduler"        # the training noise schedule's diffusers class
    sample_schedulers: tuple[str, ...] = ("ddim", "euler", "euler_a", "dpmpp_2m")  # 'sample_scheduler' choices
    # --- sizes and limits the guide reads ---
    config_folder: str = ""  # shipped full-size configs under resources/configs/ (default: the name)
    resolution_range: tuple[int, int] = (256, 1024)  # training resolutions the model handles well
    pixel_multiple: int = 8  # image sides must be multiples of this (VAE downscale x patch size)
    # Activation memory of one training sample at `resolution` in 16-bit compute without gradient
    # checkpointing (SDPA attention), in GiB: calibrated on published numbers, see guide/memory.py.
    activation_gib: float = 3.0
    # Share of those activations gradient checkpointing keeps (None: the guide's general share).
    checkpointing_factor: float | None = None
    quantized_presets: bool = False  # presets may store the frozen base in 8 or 4 bits ('base_quantization')

    # --- detection ---------------------------------------------------------------------------------------

    def matches_keys(self, keys: Collection[str]) -> bool:
        """Whether a single file's keys hold this family's text encoders (UNet and VAE are checked by the registry)."""
        return all(any(key.startswith(encoder.ldm_prefix) for key in keys) for encoder in self.text_encoders)

    def matches_folder(self, index: Mapping[str, Any], text_config: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder (model_index.json, first text encoder's config) is of this architecture."""
        if list(index.get(self.denoiser_folder, [None, None]))[1] != self.denoiser_class:
            return False
        count = sum(1 for encoder in ("text_encoder", "text_encoder_2", "text_encoder_3") if encoder in index)
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

    def configs_for(self, state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The component configs of a single file with these tensors (the shipped ones; a family whose releases
        differ in size reads them from the tensors' shapes)."""
        return self.shipped_configs()

    def build_component(self, part: str, config: Mapping[str, Any]) -> torch.nn.Module:
        """One component (a `component_folders` name) with fresh weights from its config."""
        import diffusers
        import transformers

        if part in (self.denoiser_folder, "vae"):
            cls = self.denoiser_class if part != "vae" else self.vae_class
            return getattr(diffusers, cls).from_config(dict(config))
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
        """The layers of a component a LoRA adapts (`with_conv`: LoCon's 3x3 convolutions of the denoiser);
        `part` is a component folder or the trainer's part name for the denoiser."""
        from .sizes import text_lora_targets

        if part in (self.denoiser_folder, DENOISER_PART):
            return self.denoiser_lora_targets(model, with_conv)
        return text_lora_targets(model)

    def denoiser_lora_targets(self, denoiser: Any, with_conv: bool) -> list[str]:
        """Module names of the denoiser that LoRA adapts: the UNet's attention blocks (and LoCon convs)."""
        from .sizes import unet_lora_targets

        return unet_lora_targets(denoiser, with_conv)

    def scheduler_config(self, prediction_type: str | None = None,
                         zero_terminal_snr: bool | None = None) -> dict[str, Any]:
        """The DDPM training schedule; rescaled to zero terminal SNR (diffusers' rescale_betas_zero_snr)
        where the model uses it (default: the family's)."""
        rescale = self.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr
        return {**DDPM_SCHEDULE, "prediction_type": prediction_type or self.prediction_type,
                "rescale_betas_zero_snr": rescale}

    def make_noise_scheduler(self, prediction_type: str | None = None, zero_terminal_snr: bool | None = None) -> Any:
        import diffusers

        config = self.scheduler_config(prediction_type, zero_terminal_snr)
        return getattr(diffusers, self.scheduler_class).from_config(config)

    def tokenizers(self, folder: Path | None = None) -> list[Any]:
        """One tokenizer per text encoder: CLIP's from the shipped files; T5's from `folder` (a model folder
        holding the encoder's tokenizer folder), None for an optional encoder whose files are absent."""
        from ..models.tokenizer import load_clip_tokenizer, load_t5_tokenizer

        return [load_t5_tokenizer(folder, encoder) if encoder.layout == "t5" else load_clip_tokenizer(encoder.pad_token)
                for encoder in self.text_encoders]

    def config_defaults(self, prediction_type: str | None = None,
                        zero_terminal_snr: bool | None = None) -> dict[str, Any]:
        """Settings a new model of this family starts with (schema field -> value): the model's prediction
        type and schedule (default: the family's)."""
        defaults: dict[str, Any] = {
            "model_family": self.name, "prediction_type": prediction_type or self.prediction_type,
            "resolution": self.resolution,
            "zero_terminal_snr": self.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr}
        if self.sample_schedulers[0] != "ddim":
            defaults["sample_scheduler"] = self.sample_schedulers[0]
        return defaults

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

    def predict(self, denoiser: Any, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoded: EncodedText,
                items: list[Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's output for a batch: here the UNet with the family's added conditioning.

        `timesteps` are in the objective's convention (DDPM: integer steps; flow matching: sigma x 1000)."""
        added = self.added_conditioning(encoded, items, device, dtype)
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=encoded.hidden,
                        added_cond_kwargs=added).sample

    def flow_shift(self, config: Any, latent_shape: tuple[int, ...], scheduler_config: Mapping[str, Any]) -> float:
        """The flow-matching timestep shift for latents of this shape (C, H, W): 'flow_shift' unless the family
        shifts by resolution (Flux dev)."""
        return float(config.flow_shift)

    def check_config(self, config: Any) -> None:
        """Refuse settings this family cannot train with (a ConfigError naming the setting); none by default."""

    def normalise_latents(self, latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
        """VAE latents -> what the denoiser sees: (latents - shift_factor) * scaling_factor, as the pipelines
        invert it (SD3's and Flux's VAEs have a shift; SD1/SD2/SDXL's none, and subtracting 0 is exact)."""
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return (latents - shift) * vae_config.scaling_factor if shift else latents * vae_config.scaling_factor

    # --- diffusers folder and sampling -----------------------------------------------------------------

    def model_index(self, scheduler_class: str, encoder_classes: list[str | None], diffusers_version: str) -> dict[str, Any]:
        """model_index.json of a working folder (no safety checker: A1111 does not use one either)."""
        index: dict[str, Any] = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers_version,
                                 self.denoiser_folder: ["diffusers", self.denoiser_class],
                                 "vae": ["diffusers", self.vae_class], "scheduler": ["diffusers", scheduler_class]}
        for encoder, cls in zip(self.text_encoders, encoder_classes, strict=True):
            present = cls is not None
            index[encoder.folder] = ["transformers", cls] if present else [None, None]
            index[encoder.tokenizer_folder] = ["transformers", encoder.tokenizer_class] if present else [None, None]
        return {**index, **self.index_options}

    def build_pipeline(self, components: Any, scheduler: Any) -> Any:
        """A diffusers text-to-image pipeline over the components (shared, not copied)."""
        import diffusers

        parts: dict[str, Any] = {}
        pairs = zip(self.text_encoders, components.text_encoders, components.tokenizers, strict=True)
        for encoder, model, tokenizer in pairs:
            parts[encoder.folder], parts[encoder.tokenizer_folder] = model, tokenizer
        parts[self.denoiser_folder] = components.denoiser
        return getattr(diffusers, self.pipeline_class)(vae=components.vae, scheduler=scheduler, **parts,
                                                       **self.pipeline_options)

    def sampling_scheduler(self, name: str, noise_scheduler_config: Mapping[str, Any], prediction_type: str) -> Any:
        """The previews' sampler ('sample_scheduler') over the training schedule."""
        import diffusers

        classes = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                   "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
        if name not in classes or name not in self.sample_schedulers:
            raise ConfigError(f"Setting 'sample_scheduler': {name!r} does not sample {self.label} models; use "
                              f"{' or '.join(self.sample_schedulers)}.")
        config = {**noise_scheduler_config, "prediction_type": prediction_type}
        if config.get("rescale_betas_zero_snr"):
            # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed": with a zero-terminal-
            # SNR schedule, sampling starts at the last timestep (trailing spacing).
            config["timestep_spacing"] = "trailing"
        return getattr(diffusers, classes[name]).from_config(config)

    # --- export: the names tables and what hosts detect ----------------------------------------------------

    def unet_table(self, config: Mapping[str, Any]) -> tables.BlockTable:
        """diffusers UNet module prefix -> original name under `model.diffusion_model.`."""
        return tables.unet_table(config)

    def denoiser_to_original(self, state_dict: Mapping[str, torch.Tensor],
                             config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The denoiser's weights under their single-file keys (`model.diffusion_model.…`)."""
        return tables.convert_by_table(state_dict, self.unet_table(config), tables.UNET_PREFIX, "UNet")

    def check_lora_settings(self, config: Any) -> None:
        """Refuse LoRA settings the family's files cannot carry (ConfigError naming the setting); none here."""

    def denoiser_lora_keys(self, module_names: list[str], denoiser: Any) -> dict[str, str] | None:
        """The exported LoRA key (before `.lora_down.weight`) of each adapted denoiser module; None: the
        UNet families' kohya keys (train/lora_keys.unet_key)."""
        return None

    def denoiser_lora_slots(self, denoiser: Any) -> Mapping[str, tables.Slot] | None:
        """Where hosts keep each adapted denoiser module when their layout fuses modules diffusers keeps apart
        (Flux's q/k/v), for 'lora_key_format' original: module -> Slot whose `original` is the exported LoRA key;
        the writer then writes one block-diagonal LoRA per fused layer (train/lora_fuse.py, DoRA included).
        None: denoiser_lora_tensors, else one key per module."""
        return None

    def denoiser_lora_tensors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], denoiser: Any,
                              key_format: str) -> dict[str, torch.Tensor] | None:
        """The LoRA file's tensors of the denoiser from each adapted module's (down, up x strength), in
        'lora_key_format'; None: one key per module (denoiser_lora_keys) with down, up and alpha."""
        return None

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
                "modelspec.prediction_type": MODELSPEC_PREDICTION.get(prediction, prediction)}

    # --- tiny models for tests and demos ----------------------------------------------------------------

    def tiny_configs(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError(f"{self.name} has no tiny configs")

    def tiny_tokenizers(self) -> list[Any]:
        """The tokenizers of the tiny model (the real ones, where the package ships them)."""
        return self.tokenizers()

    def tiny_extras(self, configs: Mapping[str, Mapping[str, Any]], generator: Any) -> dict[str, torch.Tensor]:
        """Keys of the family's single file that the diffusers models do not hold."""
        return {}
