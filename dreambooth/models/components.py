"""A model's parts in one object, and its `working/` folder (a plain diffusers pipeline folder).

`working/` holds model_index.json, the denoiser's folder (unet/, or transformer/ for SD3 and Flux), vae/,
text_encoder/, tokenizer/, scheduler/ (and text_encoder_2/, tokenizer_2/ for SDXL; an optional encoder that
is absent, such as SD3 without T5, has no folder and `[null, null]` in the index) plus `extras.safetensors` (the keys of the original
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
from ..families.base import DENOISER_PART
from .flux_files import FP8_DTYPES
from .tokenizer import (
    BOS,
    EOS,
    copy_t5_tokenizer,
    load_t5_tokenizer,
    load_tokenizer_folder,
    missing_t5_tokenizer,
    t5_search_dirs,
    write_tokenizer_folder,
)

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
    denoiser: Any                 # the trained diffusion model: a UNet or a transformer
    vae: Any
    text_encoders: list[Any]      # one per family text encoder; None for an absent optional one (SD3's T5)
    tokenizers: list[Any]
    noise_scheduler: Any
    prediction_type: str = "epsilon"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model_family(self) -> ModelFamily:
        return get_family(self.family)

    def present_text_encoders(self) -> list[Any]:
        """The text encoders this model holds (an absent optional one left out)."""
        return [encoder for encoder in self.text_encoders if encoder is not None]

    def modules(self) -> list[Any]:
        """Every model this holds: denoiser, VAE, present text encoders."""
        return [self.denoiser, self.vae, *self.present_text_encoders()]


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

    classes = [None if encoder is None else type(encoder).__name__ for encoder in components.text_encoders]
    return components.model_family.model_index(type(components.noise_scheduler).__name__, classes,
                                               diffusers.__version__)


def _pad_token(tokenizer: Any) -> str:
    return str(tokenizer.pad_token or EOS)


def write_components(components: Components, folder: Path) -> None:
    """Write all parts into `folder` (not atomic by itself; save_components wraps it)."""
    from safetensors.torch import save_file

    family = components.model_family
    components.denoiser.save_pretrained(folder / family.denoiser_folder, safe_serialization=True)
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    pairs = zip(components.text_encoders, components.tokenizers, family.text_encoders, strict=True)
    for encoder, tokenizer, spec in pairs:
        if encoder is None:
            continue
        save_encoder(encoder, folder / spec.folder)
        if spec.layout == "t5":
            copy_t5_tokenizer(tokenizer, folder / spec.tokenizer_folder)
        else:
            write_tokenizer_folder(folder / spec.tokenizer_folder, _pad_token(tokenizer))
    components.noise_scheduler.save_pretrained(folder / "scheduler")
    extras = {key: value.detach().contiguous() for key, value in components.extras.items()}
    save_file(extras, str(folder / EXTRAS_FILE))
    (folder / FAMILY_FILE).write_text(json.dumps({"family": components.family,
                                                  "prediction_type": components.prediction_type}))
    (folder / "model_index.json").write_text(json.dumps(model_index(components), indent=2))


def save_encoder(encoder: Any, folder: Path) -> None:
    """`encoder` as transformers saves it. A T5-XXL kept in its file's fp8 is written by safetensors directly:
    older transformers (A1111's 4.30) cannot size fp8 tensors in save_pretrained, and read them back fine."""
    if not any(param.dtype in FP8_DTYPES for param in encoder.parameters()):
        encoder.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(folder)
    save_model(encoder, str(folder / "model.safetensors"), metadata={"format": "pt"})


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


def load_text_encoders(working: Path, family: ModelFamily, index: dict[str, Any],
                        dtypes: dict[str, torch.dtype]) -> list[Any]:
    import transformers

    encoders = []
    for spec in family.text_encoders:
        cls = index.get(spec.folder, [None, None])[1]
        if cls is None and not spec.optional:
            raise ModelError(f"{working} lacks the text encoder {spec.folder} its model family needs; create the "
                             "model again from its checkpoint.")
        encoders.append(None if cls is None else without_fp8(getattr(transformers, cls).from_pretrained(
            str(working / spec.folder), torch_dtype=dtypes[spec.folder], local_files_only=True), dtypes[spec.folder]))
    return encoders


def without_fp8(encoder: Any, dtype: torch.dtype) -> Any:
    """`encoder` with weights stored in fp8 cast to `dtype`: transformers 4.4x-4.5x keep a checkpoint's fp8
    tensors as they are whatever torch_dtype says (for its fp8 quantizers), and T5 cannot run on them."""
    for param in encoder.parameters():
        if param.dtype in FP8_DTYPES:
            param.data = param.data.to(dtype)
    return encoder


def load_tokenizers(working: Path, family: ModelFamily, encoders: list[Any]) -> list[Any]:
    """Each present encoder's tokenizer from the working folder; None where the encoder is absent."""
    tokenizers: list[Any] = []
    for spec, encoder in zip(family.text_encoders, encoders, strict=True):
        if encoder is None:
            tokenizers.append(None)
        elif spec.layout == "t5":
            tokenizers.append(load_t5_tokenizer(working, spec))
            if tokenizers[-1] is None:
                raise ModelError(missing_t5_tokenizer(t5_search_dirs(working, spec.tokenizer_folder)))
        else:
            tokenizers.append(load_tokenizer_folder(working / spec.tokenizer_folder))
    return tokenizers


def load_components(working_dir: str | Path, dtype: torch.dtype = torch.float32,
                    part_dtypes: dict[str, torch.dtype] | None = None) -> Components:
    """Load a working folder written by save_components (local files only).

    `part_dtypes` overrides `dtype` per part ('unet' (the denoiser, whatever its class), 'vae',
    'text_encoder', 'text_encoder_2', ...).
    """
    import diffusers
    from safetensors.torch import load_file

    working = Path(working_dir)
    recover_working(working)
    info = read_family(working)
    index = json.loads((working / "model_index.json").read_text())
    family = get_family(info["family"])
    dtypes = {part: dtype for part in (DENOISER_PART, "vae", *(spec.folder for spec in family.text_encoders))}
    dtypes |= part_dtypes or {}
    encoders = load_text_encoders(working, family, index, dtypes)
    extras_path = working / EXTRAS_FILE
    denoiser_class = getattr(diffusers, family.denoiser_class)
    return Components(
        family=info["family"],
        denoiser=denoiser_class.from_pretrained(str(working / family.denoiser_folder),
                                                torch_dtype=dtypes[DENOISER_PART], local_files_only=True),
        vae=getattr(diffusers, family.vae_class).from_pretrained(str(working / "vae"), torch_dtype=dtypes["vae"],
                                                                 local_files_only=True),
        text_encoders=encoders, tokenizers=load_tokenizers(working, family, encoders),
        noise_scheduler=getattr(diffusers, family.scheduler_class).from_pretrained(str(working / "scheduler"),
                                                                                   local_files_only=True),
        prediction_type=info["prediction_type"],
        extras=load_file(str(extras_path)) if extras_path.is_file() else {})


# --- sampling pipeline -----------------------------------------------------------------------------

def sampling_scheduler(components: Components, scheduler_name: str = "ddim") -> Any:
    return components.model_family.sampling_scheduler(scheduler_name, dict(components.noise_scheduler.config),
                                                      components.prediction_type)


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
