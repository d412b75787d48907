"""A model's parts in one object, and its `working/` folder (a plain diffusers pipeline folder).

`working/` holds model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (and
text_encoder_2/, tokenizer_2/ for SDXL) plus `extras.safetensors` (the keys of the original
single file that are no UNet/VAE/text-encoder weight, copied back on export) and `family.json`.
Everything loads from local files only.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import fsync_path, fsync_tree
from ..errors import ModelError
from .tokenizer import BOS, EOS, load_tokenizer_folder, write_tokenizer_folder

FAMILIES = ("sd1", "sd2", "sd2v", "sdxl")
PREDICTION_TYPES = {"sd1": "epsilon", "sd2": "epsilon", "sd2v": "v_prediction", "sdxl": "epsilon"}
RESOLUTIONS = {"sd1": 512, "sd2": 512, "sd2v": 768, "sdxl": 1024}
# SD2's and SDXL's OpenCLIP tokenizers pad with "!" (id 0); CLIP-L pads with the end token.
PAD_TOKENS = {"sd1": [EOS], "sd2": ["!"], "sd2v": ["!"], "sdxl": [EOS, "!"]}
EXTRAS_FILE = "extras.safetensors"
FAMILY_FILE = "family.json"
SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m")


@dataclass
class Components:
    """Everything training, sampling and export need of one Stable Diffusion model."""

    family: str
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    prediction_type: str = "epsilon"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ModelError(f"Model family {family!r} is not supported; use one of {', '.join(FAMILIES)}.")
    return family


def scheduler_config(family: str, prediction_type: str | None = None) -> dict[str, Any]:
    """The DDPM training schedule all SD1/SD2/SDXL models share (ldm's 'linear' = diffusers' scaled_linear)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 1, "timestep_spacing": "leading", "variance_type": "fixed_small",
            "prediction_type": prediction_type or PREDICTION_TYPES[check_family(family)]}


def make_noise_scheduler(family: str, prediction_type: str | None = None) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config(family, prediction_type))


# --- working/ folder -------------------------------------------------------------------------------

def _te_folders(count: int) -> list[tuple[str, str]]:
    return [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")][:count]


def model_index(components: Components) -> dict[str, Any]:
    """model_index.json of the working folder (no safety checker: A1111 does not use one either)."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if components.is_sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", type(components.noise_scheduler).__name__]}
    for encoder, (te_name, tok_name) in zip(components.text_encoders, _te_folders(len(components.text_encoders)), strict=True):
        index[te_name] = ["transformers", type(encoder).__name__]
        index[tok_name] = ["transformers", "CLIPTokenizer"]
    if components.is_sdxl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


def _pad_token(tokenizer: Any) -> str:
    return str(tokenizer.pad_token or EOS)


def write_components(components: Components, folder: Path) -> None:
    """Write all parts into `folder` (not atomic by itself; save_components wraps it)."""
    from safetensors.torch import save_file

    components.unet.save_pretrained(folder / "unet", safe_serialization=True)
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    pairs = zip(components.text_encoders, components.tokenizers, _te_folders(len(components.text_encoders)),
                strict=True)
    for encoder, tokenizer, (te_name, tok_name) in pairs:
        encoder.save_pretrained(folder / te_name, safe_serialization=True)
        write_tokenizer_folder(folder / tok_name, _pad_token(tokenizer))
    components.noise_scheduler.save_pretrained(folder / "scheduler")
    extras = {key: value.detach().contiguous() for key, value in components.extras.items()}
    save_file(extras, str(folder / EXTRAS_FILE))
    (folder / FAMILY_FILE).write_text(json.dumps({"family": components.family,
                                                  "prediction_type": components.prediction_type}))
    (folder / "model_index.json").write_text(json.dumps(model_index(components), indent=2))


def _old_name(working: Path) -> Path:
    return working.with_name(f".{working.name}.old")


def recover_working(working: Path) -> None:
    """Finish a swap a crash interrupted: if only the old folder exists, put it back."""
    old = _old_name(working)
    if old.is_dir() and not working.exists():
        os.replace(old, working)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def save_components(components: Components, working_dir: str | Path) -> Path:
    """Save into `working_dir` atomically: write a sibling temp folder, fsync, swap with renames."""
    working = Path(working_dir)
    working.parent.mkdir(parents=True, exist_ok=True)
    recover_working(working)
    tmp = working.with_name(f".{working.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_components(components, tmp)
        fsync_tree(tmp)
        if working.exists():
            os.replace(working, _old_name(working))
        os.replace(tmp, working)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_working(working)
        raise
    shutil.rmtree(_old_name(working), ignore_errors=True)
    fsync_path(working.parent)  # makes the renames durable
    return working


def read_family(working: Path) -> dict[str, str]:
    path = working / FAMILY_FILE
    if not path.is_file():
        raise ModelError(f"{working} is not a model working folder ({FAMILY_FILE} is missing); "
                         "create the model again from its checkpoint.")
    return json.loads(path.read_text())


def _load_text_encoders(working: Path, index: dict[str, Any], dtypes: dict[str, torch.dtype]) -> list[Any]:
    import transformers

    encoders = []
    for te_name, _ in _te_folders(2):
        if te_name in index:
            cls = getattr(transformers, index[te_name][1])
            encoders.append(cls.from_pretrained(str(working / te_name), torch_dtype=dtypes[te_name],
                                                local_files_only=True))
    return encoders


def load_components(working_dir: str | Path, dtype: torch.dtype = torch.float32,
                    part_dtypes: dict[str, torch.dtype] | None = None) -> Components:
    """Load a working folder written by save_components (local files only).

    `part_dtypes` overrides `dtype` per part ('unet', 'vae', 'text_encoder', 'text_encoder_2').
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    working = Path(working_dir)
    recover_working(working)
    info = read_family(working)
    index = json.loads((working / "model_index.json").read_text())
    dtypes = {part: dtype for part in ("unet", "vae", "text_encoder", "text_encoder_2")} | (part_dtypes or {})
    encoders = _load_text_encoders(working, index, dtypes)
    tokenizers = [load_tokenizer_folder(working / tok) for _, tok in _te_folders(len(encoders))]
    extras_path = working / EXTRAS_FILE
    return Components(
        family=info["family"],
        unet=UNet2DConditionModel.from_pretrained(str(working / "unet"), torch_dtype=dtypes["unet"],
                                                  local_files_only=True),
        vae=AutoencoderKL.from_pretrained(str(working / "vae"), torch_dtype=dtypes["vae"], local_files_only=True),
        text_encoders=encoders, tokenizers=tokenizers,
        noise_scheduler=DDPMScheduler.from_pretrained(str(working / "scheduler"), local_files_only=True),
        prediction_type=info["prediction_type"],
        extras=load_file(str(extras_path)) if extras_path.is_file() else {})


# --- sampling pipeline -----------------------------------------------------------------------------

def sampling_scheduler(components: Components, scheduler_name: str = "ddim") -> Any:
    import diffusers

    classes = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
               "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
    if scheduler_name not in classes:
        raise ModelError(f"Sampler {scheduler_name!r} is unknown; use one of {', '.join(classes)}.")
    config = dict(components.noise_scheduler.config)
    config["prediction_type"] = components.prediction_type
    return getattr(diffusers, classes[scheduler_name]).from_config(config)


def build_pipeline(components: Components, scheduler_name: str = "ddim") -> Any:
    """A diffusers text-to-image pipeline over the components (shared, not copied), without safety checker."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = sampling_scheduler(components, scheduler_name)
    if components.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1], tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1], unet=components.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
        unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


__all__ = ["BOS", "EOS", "FAMILIES", "Components", "build_pipeline", "load_components", "make_noise_scheduler",
           "save_components", "scheduler_config"]
