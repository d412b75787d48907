"""Model families: one unit per family behind one interface (`base.ModelFamily`), and their registry.

Each module of this package that defines `FAMILIES` is a family unit (sd1, sd2 with sd2v, sdxl with sdxlv, sd3,
flux with flux-dev and flux-schnell);
adding a family means adding its module (and its tests). Public API:

- ``FAMILY_NAMES`` - registered family names, in registry order (the config schema's choices).
- ``get_family(name)`` - the family; a ModelError names the choices for an unknown one.
- ``architecture_of(keys)`` - the base family of a single file's keys ('sd1', 'sd2', 'sdxl', 'sd3').
- ``read_markers(keys, metadata, yaml_text)`` - what a file tells about its variant (prediction type,
  zero-terminal SNR) through the markers hosts read: `v_pred`/`ztsnr` keys, metadata, a yaml beside it.
- ``detect_family(keys, metadata=None, yaml_text=None)`` - the family of a single file.
- ``zero_terminal_snr_of(family, keys, metadata)`` - whether a single file's model uses the zero-terminal-SNR
  schedule (its `ztsnr` marker, else the family's default).
- ``resolve_family(keys, metadata, yaml_text, requested, prediction_type, source)`` - family and prediction
  type of a single file, given what the user asked for.
- ``folder_family(index, text_config, scheduler_prediction, requested, prediction_type)`` - the same for a
  diffusers folder.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError
from .base import PREDICTION_TYPES, V_PRED_KEY, ZTSNR_KEY, ModelFamily, TextEncoder
from .tables import UNET_PREFIX, VAE_PREFIX

EMA_UNET_PREFIX = "model_ema.diffusion_model"

# Modules of this package shared by the families (not units); clip_text, t5_text and flux_model import torch,
# the units do not.
SHARED_MODULES = frozenset({"base", "tables", "clip_text", "t5_text", "sizes", "mmdit_table", "flux_names",
                            "flux_model"})


def _discover() -> dict[str, ModelFamily]:
    registry: dict[str, ModelFamily] = {}
    units = [info.name for info in pkgutil.iter_modules(__path__) if info.name not in SHARED_MODULES]
    for name in sorted(units):
        module = importlib.import_module(f"{__name__}.{name}")
        for family in getattr(module, "FAMILIES", ()):
            registry[family.name] = family
    return registry


_REGISTRY = _discover()
FAMILY_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_family(name: str) -> ModelFamily:
    if name not in _REGISTRY:
        raise ModelError(f"Model family {name!r} is not supported; use one of {', '.join(FAMILY_NAMES)}.")
    return _REGISTRY[name]


def all_families() -> list[ModelFamily]:
    return list(_REGISTRY.values())


def _base_families() -> list[ModelFamily]:
    """One family per architecture: the one named after it."""
    return [family for family in _REGISTRY.values() if family.name == family.architecture]


def _has_prefix(keys: Collection[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def transformer_family_of(keys: Iterable[str]) -> str | None:
    """The transformer family (SD3, Flux dev/schnell) whose weights a single file's keys hold, else None; also
    for files of the transformer alone (Forge's Flux files)."""
    keys = list(keys)
    found = [family for family in all_families() if family.denoiser_folder != "unet" and family.matches_keys(keys)]
    return found[0].name if found else None


def architecture_of(keys: Iterable[str]) -> ModelFamily:
    """The base family whose text encoders a single file holds (the one with most encoders wins)."""
    keys = list(keys)
    # Some tools save only the EMA copy of the UNet ('model_ema.diffusion_model...'); loading puts it in place.
    has_unet = _has_prefix(keys, UNET_PREFIX) or _has_prefix(keys, EMA_UNET_PREFIX)
    if not has_unet or not _has_prefix(keys, VAE_PREFIX):
        raise ModelError("The file is not a Stable Diffusion checkpoint (no UNet or VAE weights in the original "
                         "layout); LoRA, embedding and VAE-only files cannot be trained as a model.")
    matching = [family for family in _base_families() if family.matches_keys(keys)]
    if not matching:
        known = ", ".join(family.label for family in _base_families())
        raise ModelError(f"The checkpoint has no text encoder this tool knows; only these model families are "
                         f"supported: {known}.")
    return max(matching, key=lambda family: len(family.text_encoders))


@dataclass(frozen=True)
class Markers:
    """What a file tells about its variant; None where it tells nothing."""

    prediction_type: str | None = None
    zero_terminal_snr: bool | None = None


def _yaml_value(config: Any, *path: str) -> Any:
    for name in path:
        config = config.get(name) if isinstance(config, Mapping) else None
    return config


def yaml_prediction(yaml_text: str) -> str:
    """The prediction type a yaml beside a checkpoint gives, read as AUTOMATIC1111 and Forge read it: ldm's
    `parameterization: "v"` (SD 2.x) or an sgm denoiser whose scaling is VScaling (SDXL); anything else is
    epsilon (the host builds the model from the yaml)."""
    import yaml

    try:
        config = yaml.safe_load(yaml_text)
    except yaml.YAMLError as error:
        raise ModelError(f"The .yaml beside the checkpoint is not valid YAML ({str(error).splitlines()[0]}); "
                         "fix or remove it.") from None
    params = ("model", "params")
    scaling = _yaml_value(config, *params, "denoiser_config", "params", "scaling_config", "target")
    is_v = _yaml_value(config, *params, "parameterization") == "v" or str(scaling or "").endswith(".VScaling")
    return "v_prediction" if is_v else "epsilon"


def _metadata_prediction(metadata: Mapping[str, str]) -> str | None:
    if metadata.get("dreambooth_prediction_type") in PREDICTION_TYPES:
        return metadata["dreambooth_prediction_type"]
    return {"v": "v_prediction", "epsilon": "epsilon"}.get(metadata.get("modelspec.prediction_type", ""))


def _zero_terminal_snr(keys: Collection[str], metadata: Mapping[str, str]) -> bool | None:
    """Hosts sample with the rescaled schedule exactly when the `ztsnr` key is there; next to a `v_pred`
    key its absence says the model does without (the keys come as a pair). Our metadata goes first."""
    recorded = metadata.get("dreambooth_zero_terminal_snr")
    if recorded in ("True", "False"):
        return recorded == "True"
    if ZTSNR_KEY in keys:
        return True
    return False if V_PRED_KEY in keys else None


def read_markers(keys: Collection[str], metadata: Mapping[str, str] | None = None,
                 yaml_text: str | None = None) -> Markers:
    """Our metadata first, then the `v_pred`/`ztsnr` keys (Forge, reForge, SD.Next, ComfyUI), then a yaml
    beside the file (AUTOMATIC1111)."""
    metadata = metadata or {}
    prediction = _metadata_prediction(metadata)
    if prediction is None and V_PRED_KEY in keys:
        prediction = "v_prediction"
    if prediction is None and yaml_text is not None:
        prediction = yaml_prediction(yaml_text)
    return Markers(prediction, _zero_terminal_snr(keys, metadata))


def variant(base: ModelFamily, prediction_type: str, zero_terminal_snr: bool | None = None) -> ModelFamily:
    """The family of `base`'s architecture trained with this objective (the base family when none is)."""
    same = [family for family in _REGISTRY.values() if family.architecture == base.architecture
            and family.prediction_type == prediction_type]
    exact = [family for family in same if zero_terminal_snr is None or family.zero_terminal_snr == zero_terminal_snr]
    return (exact or same or [base])[0]


def detect_family(keys: Iterable[str], metadata: Mapping[str, str] | None = None,
                  yaml_text: str | None = None) -> ModelFamily:
    """The family of a single file from its keys, metadata and the yaml beside it."""
    keys = list(keys)
    base = architecture_of(keys)
    markers = read_markers(keys, metadata, yaml_text)
    return variant(base, markers.prediction_type or base.prediction_type, markers.zero_terminal_snr)


def _objective_fits(base: ModelFamily, prediction: str, source: str) -> str:
    """The prediction type, unless it crosses between flow matching and the DDPM objectives (another model)."""
    if (prediction == "flow_matching") != (base.prediction_type == "flow_matching"):
        raise ModelError(f"{source} is a {base.label} model, which trains with {base.prediction_type}, not "
                         f"{prediction}; leave the prediction type to detection.")
    return prediction


def resolve_family(keys: Iterable[str], metadata: Mapping[str, str] | None, yaml_text: str | None,
                   requested: str | None, prediction_type: str | None, source: str = "The checkpoint"
                   ) -> tuple[ModelFamily, str]:
    """Family and prediction type: what the file tells, else the caller's choice, else the family's default."""
    keys = list(keys)
    base = architecture_of(keys)
    wanted = get_family(requested) if requested is not None else None
    if wanted is not None and wanted.architecture != base.architecture:
        raise ModelError(f"{source} is a {base.name} model, not {wanted.name}; choose the detected family.")
    markers = read_markers(keys, metadata, yaml_text)
    prediction = _objective_fits(base, markers.prediction_type or prediction_type or (wanted or base).prediction_type,
                                 source)
    return variant(base, prediction, markers.zero_terminal_snr), prediction


def zero_terminal_snr_of(family: ModelFamily, keys: Iterable[str], metadata: Mapping[str, str] | None = None
                         ) -> bool:
    """Whether a single file's model samples and trains with the zero-terminal-SNR schedule: what its markers
    say, else the family's default (NoobAI-XL style v-prediction SDXL files told by a yaml alone use it)."""
    told = _zero_terminal_snr(set(keys), metadata or {})
    return family.zero_terminal_snr if told is None else told


def folder_family(index: Mapping[str, Any], text_config: Mapping[str, Any], scheduler_prediction: str | None,
                  requested: str | None, prediction_type: str | None) -> tuple[ModelFamily, str]:
    """Family and prediction type of a diffusers folder: the caller's prediction type, a variant the caller
    asked for, the scheduler's prediction type, the family's default - in that order."""
    matching = [family for family in _base_families() if family.matches_folder(index, text_config)]
    if not matching:
        raise ModelError("The diffusers folder's text encoders fit no supported model family.")
    base = matching[0]
    wanted = get_family(requested) if requested is not None else None
    asked_variant = wanted if wanted is not None and wanted.architecture == base.architecture \
        and wanted is not base else None
    prediction = prediction_type or (asked_variant.prediction_type if asked_variant else None) \
        or scheduler_prediction or base.prediction_type
    return variant(base, _objective_fits(base, prediction, "The diffusers folder")), prediction


__all__ = ["FAMILY_NAMES", "Markers", "ModelFamily", "TextEncoder", "all_families", "architecture_of",
           "detect_family", "folder_family", "get_family", "read_markers", "resolve_family", "variant",
           "yaml_prediction", "zero_terminal_snr_of"]
