"""Export a model as one `.safetensors` file in the original layout A1111 1.10 and Forge load.

All three components are written (a file without a text encoder makes A1111 silently keep the
previous model's), the text encoder always with the `text_model.` prefix transformers 4.30 needs,
and every extra key of the base file (scheduler tables, EMA counters, SD2's unused last text layer)
is copied byte for byte; a model without them gets the standard fp32 tables, because A1111 keeps
the previous model's tables otherwise and fp16 tables change the images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import save_safetensors, write_text
from ..errors import ModelError
from ..families.base import V_PRED_KEY, ZTSNR_KEY
from .components import Components, load_components, uses_zero_terminal_snr
from .convert import text_encoder_to_ldm, vae_to_ldm

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Warn when a half-precision file would keep less than half of what training changed.
LOSS_WARNING_FRACTION = 0.5


def text_encoders_to_ldm(components: Components) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    for spec, encoder in zip(components.model_family.text_encoders, components.text_encoders, strict=True):
        if encoder is not None:
            converted.update(text_encoder_to_ldm(spec, encoder.state_dict()))
    return converted


def model_to_ldm(components: Components) -> dict[str, torch.Tensor]:
    """Denoiser, VAE and text encoder weights under their original keys (no extras)."""
    family = components.model_family
    denoiser = components.denoiser
    return {**family.denoiser_to_original(denoiser.state_dict(), denoiser.config),
            **vae_to_ldm(components.vae.state_dict(), family.vae_table(components.vae.config)),
            **text_encoders_to_ldm(components)}


def ldm_scheduler_tables(beta_start: float = 0.00085, beta_end: float = 0.012,
                         steps: int = 1000) -> dict[str, torch.Tensor]:
    """The 12 schedule buffers ldm's LatentDiffusion stores, computed as it does (float64 -> fp32)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - previous) / (1.0 - cumprod)
    tables = {"betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": previous,
              "sqrt_alphas_cumprod": cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
              "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
              "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
              "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1).sqrt(),
              "posterior_variance": posterior_variance,
              "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
              "posterior_mean_coef1": betas * previous.sqrt() / (1.0 - cumprod),
              "posterior_mean_coef2": (1.0 - previous) * alphas.sqrt() / (1.0 - cumprod)}
    return {name: value.to(torch.float32) for name, value in tables.items()}


def extra_tensors(components: Components) -> dict[str, torch.Tensor]:
    """The base file's other keys, the markers of what the model is now (the base file's are dropped: training
    may have changed its prediction type or schedule), and the standard schedule tables when the family's
    files carry them (SD1/SD2; SDXL's do not) and the base file had none."""
    markers = components.model_family.marker_tensors(components.prediction_type,
                                                     uses_zero_terminal_snr(components))
    kept = {key: value for key, value in components.extras.items() if key not in (V_PRED_KEY, ZTSNR_KEY)}
    extras = {**kept, **markers}
    if "alphas_cumprod" in extras or not components.model_family.schedule_tables:
        return extras
    config = components.noise_scheduler.config
    return {**ldm_scheduler_tables(config.beta_start, config.beta_end, config.num_train_timesteps), **extras}


def _cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: (value.to(dtype) if value.is_floating_point() else value).detach().contiguous()
            for key, value in tensors.items()}


def checkpoint_state_dict(components: Components, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """The whole single file: model weights in `precision`, extras unchanged."""
    if precision not in PRECISIONS:
        raise ModelError(f"Export precision {precision!r} is unknown; use fp32, fp16 or bf16.")
    weights = _cast(model_to_ldm(components), PRECISIONS[precision])
    extras = {key: value.detach().contiguous() for key, value in extra_tensors(components).items()
              if key not in weights}
    return {**extras, **weights}


def precision_loss_fraction(trained: Mapping[str, torch.Tensor] | torch.Tensor,
                            base: Mapping[str, torch.Tensor] | torch.Tensor, precision: str) -> float:
    """Of the elements training changed, the fraction a save in `precision` would turn back to the base value."""
    dtype = PRECISIONS[precision]
    pairs = [(trained, base)] if isinstance(trained, torch.Tensor) else [
        (value, base[key]) for key, value in trained.items() if key in base and value.is_floating_point()]
    changed = lost = 0
    for new, old in pairs:
        new, old = new.detach().float(), old.detach().to(new.device).float()
        moved = new != old
        changed += int(moved.sum())
        lost += int((moved & (new.to(dtype) == old.to(dtype))).sum())
    return lost / changed if changed else 0.0


def precision_warning(components: Components, base: Components | Mapping[str, torch.Tensor],
                      precision: str) -> str | None:
    """A warning when a half-precision export would lose most of the training change, else None."""
    if precision == "fp32":
        return None
    base_weights = model_to_ldm(base) if isinstance(base, Components) else base
    fraction = precision_loss_fraction(model_to_ldm(components), base_weights, precision)
    if fraction <= LOSS_WARNING_FRACTION:
        return None
    return (f"A {precision} export keeps only {100 * (1 - fraction):.0f}% of the weight changes training made "
            f"(the rest round back to the base model); export in fp32 to keep them all.")


def component_configs(components: Components) -> dict[str, dict[str, Any]]:
    """The diffusers and transformers configs of the model's parts, as plain JSON values."""
    family = components.model_family
    configs = {family.denoiser_folder: dict(components.denoiser.config), "vae": dict(components.vae.config)}
    for spec, encoder in zip(family.text_encoders, components.text_encoders, strict=True):
        if encoder is not None:  # an absent optional encoder (SD3's T5) has no config to carry
            configs[spec.folder] = encoder.config.to_dict()
    return json.loads(json.dumps(configs, default=str))


# Config keys that describe the file, not the architecture.
NOT_ARCHITECTURE = ("architectures", "torch_dtype", "dtype", "transformers_version")


def _differs(own: Mapping[str, Any], shipped: Mapping[str, Any]) -> bool:
    return any(own.get(key) != value for key, value in shipped.items()
               if not key.startswith("_") and key not in NOT_ARCHITECTURE)


def architecture_metadata(components: Components) -> dict[str, str]:
    """The model's configs, for a model that is not its family's full-size architecture (a demo or world
    model): loading reads them from the file instead of the shipped configs, so every export loads back."""
    from .loading import CONFIGS_METADATA_KEY

    own = component_configs(components)
    shipped = components.model_family.shipped_configs()
    if not any(_differs(own[name], json.loads(json.dumps(shipped.get(name, {})))) for name in own):
        return {}
    return {CONFIGS_METADATA_KEY: json.dumps(own)}


def checkpoint_metadata(components: Components, metadata: Mapping[str, Any] | None) -> dict[str, str]:
    combined = {"dreambooth_family": components.family, "dreambooth_prediction_type": components.prediction_type,
                "dreambooth_zero_terminal_snr": str(uses_zero_terminal_snr(components)),
                **architecture_metadata(components)}
    combined.update({str(key): value if isinstance(value, str) else json.dumps(value)
                     for key, value in (metadata or {}).items()})
    return combined


def export_checkpoint(components: Components, out_path: str | Path, precision: str = "fp32",
                      metadata: Mapping[str, Any] | None = None,
                      base: Components | Mapping[str, torch.Tensor] | None = None,
                      warn: Callable[[str], None] | None = None) -> Path:
    """Write `out_path` (.safetensors, original layout) atomically, with the family's side files (SD2-v: .yaml).

    With `base` (the model before training) a half-precision export that would lose most of the
    change is reported through `warn` (default: the module logger).
    """
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ModelError(f"Export file {out} must end in .safetensors.")
    if base is not None:
        message = precision_warning(components, base, precision)
        if message:
            (warn or logger.warning)(message)
    save_safetensors(checkpoint_state_dict(components, precision), out,
                     metadata=checkpoint_metadata(components, metadata))
    for suffix, text in components.model_family.side_files(components.prediction_type).items():
        write_text(out.with_suffix(suffix), text)
    return out


def export_working(working: str | Path, out_path: str | Path, precision: str = "fp32",
                   metadata: Mapping[str, Any] | None = None, warn: Callable[[str], None] | None = None) -> Path:
    """Export a model's working folder, its weights loaded straight in the export precision: the same bytes as
    loading fp32 and casting, without an fp32 copy of the model beside the half one (for SDXL 7 GB of weights held
    instead of 21; measured peak RSS 15.6 GB, the rest the fp32 files mapped while they are read)."""
    if precision not in PRECISIONS:
        raise ModelError(f"Export precision {precision!r} is unknown; use fp32, fp16 or bf16.")
    return export_checkpoint(load_components(working, PRECISIONS[precision]), out_path, precision, metadata,
                             warn=warn)
