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
from ..families import FAMILY_NAMES, ModelFamily, all_families, get_family
from .tokenizer import BOS, EOS, load_tokenizer_folder, write_tokenizer_folder

# The families' facts by name, for callers that look them up by name (the family units hold them).
FAMILIES = FAMILY_NAMES
PREDICTION_TYPES = {family.name: family.prediction_type for family in all_families()}
EXTRAS_FILE = "extras.safetensors"
FAMILY_FILE = "family.json"
SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
GUIDANCE_RESCALE = 0.7  # Lin et al. 2023's recommended phi for zero-terminal-SNR models


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
    def model_family(self) -> ModelFamily:
        return get_family(self.family)


def uses_zero_terminal_snr(components: Components) -> bool:
    """Whether the model's schedule is rescaled to zero terminal SNR (what it trains and samples with)."""
    return bool(components.noise_scheduler.config.get("rescale_betas_zero_snr", False))


def check_family(family: str) -> str:
    return get_family(family).name


def scheduler_config(family: str, prediction_type: str | None = None) -> dict[str, Any]:
    """The family's DDPM training schedule."""
    return get_family(family).scheduler_config(prediction_type)


def make_noise_scheduler(family: str, prediction_type: str | None = None) -> Any:
    return get_family(family).make_noise_scheduler(prediction_type)


# --- working/ folder -------------------------------------------------------------------------------

def model_index(components: Components) -> dict[str, Any]:
    import diffusers

    return components.model_family.model_index(type(components.noise_scheduler).__name__,
                                               [type(encoder).__name__ for encoder in components.text_encoders],
                                               diffusers.__version__)


def _pad_token(tokenizer: Any) -> str:
    return str(tokenizer.pad_token or EOS)


def write_components(components: Components, folder: Path) -> None:
    """Write all parts into `folder` (not atomic by itself; save_components wraps it)."""
    from safetensors.torch import save_file

    components.unet.save_pretrained(folder / "unet", safe_serialization=True)
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    pairs = zip(components.text_encoders, components.tokenizers, components.model_family.text_encoders,
                strict=True)
    for encoder, tokenizer, spec in pairs:
        encoder.save_pretrained(folder / spec.folder, safe_serialization=True)
        write_tokenizer_folder(folder / spec.tokenizer_folder, _pad_token(tokenizer))
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


def _load_text_encoders(working: Path, family: ModelFamily, index: dict[str, Any],
                        dtypes: dict[str, torch.dtype]) -> list[Any]:
    import transformers

    return [getattr(transformers, index[spec.folder][1]).from_pretrained(
                str(working / spec.folder), torch_dtype=dtypes[spec.folder], local_files_only=True)
            for spec in family.text_encoders]


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
    family = get_family(info["family"])
    dtypes = {part: dtype for part in ("unet", "vae", *(spec.folder for spec in family.text_encoders))}
    dtypes |= part_dtypes or {}
    encoders = _load_text_encoders(working, family, index, dtypes)
    tokenizers = [load_tokenizer_folder(working / spec.tokenizer_folder) for spec in family.text_encoders]
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
    if config.get("rescale_betas_zero_snr"):
        # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed": with a zero-terminal-
        # SNR schedule, sampling starts at the last timestep (trailing spacing).
        config["timestep_spacing"] = "trailing"
    return getattr(diffusers, classes[scheduler_name]).from_config(config)


def call_options(pipeline: Any) -> dict[str, Any]:
    """Options of a pipeline call that the model's schedule asks for: with zero terminal SNR, classifier-free
    guidance rescaled by 0.7 (Lin et al. 2023, section 3.4: keeps the rescaled schedule from overexposing)."""
    config = getattr(getattr(pipeline, "scheduler", None), "config", None) or {}
    return {"guidance_rescale": GUIDANCE_RESCALE} if config.get("rescale_betas_zero_snr") else {}


def build_pipeline(components: Components, scheduler_name: str = "ddim") -> Any:
    """A diffusers text-to-image pipeline over the components (shared, not copied), without safety checker."""
    return components.model_family.build_pipeline(components, sampling_scheduler(components, scheduler_name))


__all__ = ["BOS", "EOS", "FAMILIES", "Components", "build_pipeline", "load_components", "make_noise_scheduler",
           "save_components", "scheduler_config"]
