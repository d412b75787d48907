"""Create a trainable model from an original single-file checkpoint or a diffusers folder, offline.

UNet and VAE are read by diffusers' own single-file converters with the component configs shipped in
`dreambooth/resources/configs/<family>/` (or, for tiny demo files, the configs embedded in the file's
metadata), so nothing is fetched from the hub. `.ckpt` files are read with torch's weights-only
unpickler: a pickle that tries to run code is refused, never executed.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json
from ..errors import ModelError
from ..families import (
    EMA_UNET_PREFIX,
    ModelFamily,
    TextEncoder,
    architecture_of,
    folder_family,
    get_family,
    zero_terminal_snr_of,
)
from ..families import resolve_family as resolve_file_family
from ..families.tables import UNET_PREFIX
from ..store import ModelDir, ModelStore
from .components import Components, load_components, load_text_encoders, save_components
from .convert import normalise_clip_l_keys, text_encoder_from_ldm
from .flux_files import file_roles as flux_file_roles
from .text_encoders import load_text_encoder, text_encoder_folders, with_separate_text_encoders
from .tokenizer import (
    load_clip_tokenizer,
    load_t5_tokenizer,
    load_tokenizer_folder,
    missing_t5_tokenizer,
    t5_search_dirs,
)

log = logging.getLogger(__name__)

CONFIGS_METADATA_KEY = "dreambooth_configs"
EMA_PREFIX = "model_ema."
PART_NAMES = {"unet": "UNet", "vae": "VAE", "transformer": "transformer"}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# --- reading files -------------------------------------------------------------------------------------


SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ModelError(f"Checkpoint {path} cannot be read ({error}); the file is damaged or incomplete - "
                         "download or copy it again.") from None
    return tensors, metadata


def stored_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The half precision every floating tensor of a checkpoint shares (float16 or bfloat16), else float32: a
    model built in it holds exactly the file's values, in half the memory of float32 (SDXL: 7 of 14 GiB)."""
    found = {value.dtype for value in state.values() if value.is_floating_point()}
    return found.pop() if len(found) == 1 and found <= {torch.float16, torch.bfloat16} else torch.float32


def file_precision(path: Path) -> torch.dtype:
    """stored_dtype of a .safetensors file from its header alone (float32 for any other file)."""
    if path.suffix.lower() != ".safetensors":
        return torch.float32
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        names = {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118 - not a dict
    floats = names & set(SAFETENSORS_FLOATS)
    return SAFETENSORS_FLOATS[floats.pop()] if len(floats) == 1 else torch.float32


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint, unpickled with weights_only=True: only tensors and plain containers load."""
    import pickle

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text advises loading the file without its safeguard, which would run the file's code.
        raise ModelError(f"Checkpoint {path} contains code or objects that are not tensors and is not loaded "
                         "(code in a model file is never run); use a .safetensors version of it.") from None
    except Exception:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... for a damaged archive
        raise ModelError(f"Checkpoint {path} cannot be read: it is damaged or incomplete, and code in it is never "
                         "run; download or copy it again, or use a .safetensors version of it.") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ModelError(f"Checkpoint {path} holds no state dict; it is not a Stable Diffusion checkpoint.")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a single-file checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Checkpoint {path} does not exist; check the path.")
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return read_ckpt(path), {}
    raise ModelError(f"Checkpoint {path} has an unknown type; use a .safetensors or .ckpt file.")


# --- family ---------------------------------------------------------------------------------------------


def detect_family(state_dict: Mapping[str, Any]) -> str:
    """The architecture's base family ('sd1', 'sd2', 'sdxl') from the keys of an original checkpoint alone
    (variants such as SD2's v-prediction are told by metadata or a yaml beside the file: see resolve_family)."""
    return architecture_of(state_dict).name


def _yaml_beside(path: Path) -> str | None:
    yaml = path.with_suffix(".yaml")
    return yaml.read_text(encoding="utf-8", errors="replace") if yaml.is_file() else None


def resolve_family(path: Path, state_dict: Mapping[str, Any], metadata: Mapping[str, str], family: str | None,
                   prediction_type: str | None) -> tuple[str, str]:
    """Family and prediction type: what the file tells (metadata, marker keys, yaml beside it), else the
    caller's choice."""
    found, prediction = resolve_file_family(state_dict, metadata, _yaml_beside(path), family, prediction_type,
                                            source=f"Checkpoint {path}")
    return found.name, prediction


# --- configs --------------------------------------------------------------------------------------------


def embedded_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]] | None:
    raw = metadata.get(CONFIGS_METADATA_KEY)
    return json.loads(raw) if raw else None


def file_configs(unit: ModelFamily, state: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """A single file's component configs: those it embeds (a model of its own size), the family's for the parts
    it embeds none for: an export without SD3's optional T5 has no T5 config, yet a separate T5 file is looked for
    by that config's width."""
    embedded = embedded_configs(metadata)
    return {**unit.configs_for(state), **embedded} if embedded else unit.configs_for(state)


def write_config_dir(configs: Mapping[str, Mapping[str, Any]], folder: Path) -> Path:
    for name, config in configs.items():
        write_json(folder / name / "config.json", dict(config))
    return folder


def shipped_configs(family: str) -> dict[str, dict[str, Any]]:
    """The full-size component configs shipped for `family`."""
    return get_family(family).shipped_configs()


# --- components from a state dict -----------------------------------------------------------------------


def _text_encoder_weights(state: Mapping[str, torch.Tensor], family: ModelFamily,
                          configs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
    return [text_encoder_from_ldm(spec, state, int(configs[spec.folder].get("num_hidden_layers", 0)))
            for spec in family.text_encoders]


def _text_encoders(state: Mapping[str, torch.Tensor], unit: ModelFamily, configs: Mapping[str, Mapping[str, Any]],
                   dtype: torch.dtype) -> list[Any]:
    """The family's text encoders from a state dict; None for an optional one the state does not hold."""
    weights = _text_encoder_weights(state, unit, configs)
    return [None if spec.optional and not found else load_text_encoder(spec, configs[spec.folder], found, dtype)
            for spec, found in zip(unit.text_encoders, weights, strict=True)]


def t5_tokenizer(folder: Path | None, spec: TextEncoder) -> Any:
    """T5's tokenizer from `folder` or the host's folders; a ModelError names the files and places otherwise."""
    tokenizer = load_t5_tokenizer(folder, spec)
    if tokenizer is None:
        raise ModelError(missing_t5_tokenizer(t5_search_dirs(folder, spec.tokenizer_folder)))
    return tokenizer


def _tokenizers(unit: ModelFamily, encoders: list[Any], tokenizer_dir: Path | None) -> list[Any]:
    """The family's tokenizers for the encoders present: CLIP's shipped ones; T5's from `tokenizer_dir` or the
    host's folders."""
    return [None if encoder is None else t5_tokenizer(tokenizer_dir, spec) if spec.layout == "t5"
            else load_clip_tokenizer(spec.pad_token) for spec, encoder in zip(unit.text_encoders, encoders, strict=True)]


def _diffusers_model(cls: Any, state: Mapping[str, torch.Tensor], config_dir: Path, name: str,
                     dtype: torch.dtype, source: str = "The checkpoint", family: str = "") -> Any:
    try:
        model = cls.from_single_file(dict(state), config=str(config_dir), subfolder=name, local_files_only=True,
                                     torch_dtype=dtype)
    except Exception as error:
        expected = f"the {family} architecture" if family else "the expected architecture"
        raise ModelError(f"{source}: its {PART_NAMES.get(name, name)} does not fit {expected} "
                         f"({mismatch_summary(error)}); the file is damaged, of another model type, or not a "
                         f"{family or 'Stable Diffusion'} base model.") from None
    return _to_dtype(model, dtype).eval()


def mismatch_summary(error: BaseException, limit: int = 240) -> str:
    """The telling part of a loader's error: the first weight whose shape differs, else the first line, cut at a
    word boundary (the full text can be thousands of characters of shapes)."""
    text = str(error)
    torch_style = re.search(r"size mismatch for ([\w.]+): copying a param with shape (.+?) from checkpoint, the "
                            r"shape in current model is (.+?)\.(?:\s|$)", text)
    diffusers_style = re.search(r"([\w.]+) expected shape (.+?), but got (.+?)\.(?:\s|$)", text)
    if torch_style:
        weight, given, wanted = torch_style.groups()
        text = f"weight {weight} has shape [{_dims(given)}] in the file, [{_dims(wanted)}] in the model"
    elif diffusers_style:
        weight, wanted, given = diffusers_style.groups()
        text = f"weight {weight} has shape [{_dims(given)}] in the file, [{_dims(wanted)}] in the model"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return textwrap.shorten(first, limit, placeholder=" ...")


def _dims(shape_text: str) -> str:
    """'1280, 320' from 'torch.Size([1280, 320])' or "tensor(..., device='meta', size=(1280, 320))"."""
    found = re.search(r"(?:Size\(\[|size=\()([\d, ]*)", shape_text)
    return found.group(1) if found else shape_text


def _to_dtype(model: Any, dtype: torch.dtype) -> Any:
    return model if next(model.parameters()).dtype == dtype else model.to(dtype)


def components_from_state_dict(state: Mapping[str, torch.Tensor], family: str, prediction_type: str,
                               configs: Mapping[str, Mapping[str, Any]], dtype: torch.dtype = torch.float32,
                               source: str = "The checkpoint", zero_terminal_snr: bool | None = None,
                               tokenizer_dir: Path | None = None) -> Components:
    """Components from an original-layout state dict; keys the model does not hold become extras.

    `source` names the file in error messages (the user's checkpoint, never a temporary config folder);
    `zero_terminal_snr` is the model's schedule (default: the family's); `tokenizer_dir` is where a T5
    tokenizer is looked for first (the checkpoint's folder).
    """
    import diffusers

    from .export import model_to_ldm

    unit = get_family(family)
    state = normalise_clip_l_keys(state)
    denoiser_name = unit.denoiser_folder
    with tempfile.TemporaryDirectory(prefix="dreambooth-configs-") as tmp:
        config_dir = write_config_dir({k: v for k, v in configs.items() if k in (denoiser_name, "vae")}, Path(tmp))
        denoiser = _diffusers_model(getattr(diffusers, unit.denoiser_class), state, config_dir, denoiser_name, dtype,
                                    source, family)
        vae = _diffusers_model(getattr(diffusers, unit.vae_class), state, config_dir, "vae", dtype, source, family)
    encoders = _text_encoders(state, unit, configs, dtype)
    components = Components(family=family, denoiser=denoiser, vae=vae, text_encoders=encoders,
                            tokenizers=_tokenizers(unit, encoders, tokenizer_dir),
                            noise_scheduler=unit.make_noise_scheduler(prediction_type, zero_terminal_snr),
                            prediction_type=prediction_type)
    held = set(model_to_ldm(components))
    components.extras = {key: value for key, value in state.items() if key not in held}
    return components


def load_checkpoint(path: str | Path, family: str | None = None, prediction_type: str | None = None,
                    dtype: torch.dtype | None = torch.float32, models_dir: Path | None = None) -> Components:
    """Components from an original single-file checkpoint (.safetensors or .ckpt), offline. Text encoders the
    file lacks are read from separate files beside it or in `models_dir`'s text-encoder folders; a Flux
    transformer file takes its text encoders and VAE from there too (models/text_encoder, models/VAE).
    `dtype` None: the precision the file stores (see stored_dtype)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" and "transformer" in flux_file_roles(path):
        from .flux_loading import load_flux_file

        return load_flux_file(path, models_dir, family)
    state, metadata = read_checkpoint(path)
    dtype = stored_dtype(state) if dtype is None else dtype
    family, prediction = resolve_family(path, state, metadata, family, prediction_type)
    unit = get_family(family)
    configs = file_configs(unit, state, metadata)
    rescaled = zero_terminal_snr_of(unit, state, metadata)
    state = with_ema_unet(state, family, configs[unit.denoiser_folder], path)
    state = with_separate_text_encoders(state, unit, configs, text_encoder_folders(path, models_dir),
                                        f"Checkpoint {path}")
    return components_from_state_dict(state, family, prediction, configs, dtype, f"Checkpoint {path}",
                                      zero_terminal_snr=rescaled, tokenizer_dir=path.parent)


# --- EMA-only checkpoints -------------------------------------------------------------------------------


def ema_key(ldm_key: str) -> str:
    """Where the original layout keeps the EMA copy of a UNet weight: 'model_ema.' + the key without its first
    part and without dots (model.diffusion_model.out.0.weight -> model_ema.diffusion_modelout0weight)."""
    return EMA_PREFIX + "".join(ldm_key.split(".")[1:])


def ldm_unet_keys(family: str, unet_config: Mapping[str, Any]) -> list[str]:
    """The original-layout names of every weight of a UNet built from `unet_config` (no memory allocated)."""
    import diffusers
    from accelerate import init_empty_weights

    unit = get_family(family)
    with init_empty_weights():
        denoiser = getattr(diffusers, unit.denoiser_class).from_config(dict(unet_config))
    return list(unit.denoiser_to_original(denoiser.state_dict(), denoiser.config))


def with_ema_unet(state: Mapping[str, torch.Tensor], family: str, unet_config: Mapping[str, Any],
                  path: Path) -> Mapping[str, torch.Tensor]:
    """`state` with the EMA UNet weights in the UNet's place when the file holds only those (some training
    tools save just the EMA weights); unchanged when it holds the UNet itself."""
    if any(key.startswith(UNET_PREFIX) for key in state) or not any(key.startswith(EMA_UNET_PREFIX) for key in state):
        return state
    keys = ldm_unet_keys(family, unet_config)
    missing = [key for key in keys if ema_key(key) not in state]
    if missing:
        raise ModelError(f"Checkpoint {path} holds only EMA UNet weights ('model_ema.*') and {len(missing)} of "
                         f"them are missing (e.g. {ema_key(missing[0])}); the file is incomplete.")
    log.warning("Checkpoint %s holds only the EMA weights of its UNet ('model_ema.*'); they are loaded as the "
                "UNet.", path)
    rest = {key: value for key, value in state.items() if not key.startswith(EMA_PREFIX)}
    return {**rest, **{key: state[ema_key(key)] for key in keys}}


# --- diffusers folders ----------------------------------------------------------------------------------


def _folder_tokenizers(folder: Path, family: ModelFamily, encoders: list[Any]) -> list[Any]:
    tokenizers: list[Any] = []
    for spec, encoder in zip(family.text_encoders, encoders, strict=True):
        name = spec.tokenizer_folder
        if spec.layout == "t5":
            tokenizers.append(None if encoder is None else t5_tokenizer(folder, spec))
            continue
        has_files = (folder / name / "vocab.json").is_file() and (folder / name / "merges.txt").is_file()
        tokenizers.append(load_tokenizer_folder(folder / name) if has_files else load_clip_tokenizer(spec.pad_token))
    return tokenizers


def load_diffusers_folder(folder: str | Path, family: str | None = None, prediction_type: str | None = None,
                          dtype: torch.dtype = torch.float32) -> Components:
    """Components from a diffusers pipeline folder (ours or any other), local files only."""
    import diffusers

    folder = Path(folder)
    if (folder / "family.json").is_file():
        return load_components(folder, dtype)
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") == "FluxPipeline":
        from .flux_loading import load_flux_folder

        return load_flux_folder(folder, family)
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    detected, prediction = folder_family(index, text_config, scheduler.get("prediction_type"), family,
                                         prediction_type)
    encoders = load_text_encoders(folder, detected, index, dict.fromkeys(
        (spec.folder for spec in detected.text_encoders), dtype))
    load = {part: getattr(diffusers, cls).from_pretrained(str(folder / part), torch_dtype=dtype, local_files_only=True)
            for part, cls in ((detected.denoiser_folder, detected.denoiser_class), ("vae", detected.vae_class))}
    return Components(family=detected.name, denoiser=load[detected.denoiser_folder], vae=load["vae"],
                      text_encoders=encoders,
                      tokenizers=_folder_tokenizers(folder, detected, encoders),
                      noise_scheduler=detected.make_noise_scheduler(prediction, scheduler.get("rescale_betas_zero_snr")),
                      prediction_type=prediction)


def load_source(source: str | Path, family: str | None = None, prediction_type: str | None = None,
                dtype: torch.dtype | None = torch.float32, models_dir: Path | None = None) -> Components:
    """Components from a checkpoint file or a diffusers folder (`models_dir`: the host's models folder, whose
    text-encoder and VAE folders hold the parts a checkpoint may lack). `dtype` None keeps a single file's own
    half precision (a diffusers folder loads in float32)."""
    source = Path(source)
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise ModelError(f"Folder {source} is not a diffusers model (no model_index.json); "
                             "choose a .safetensors/.ckpt file or a diffusers folder.")
        try:
            return load_diffusers_folder(source, family, prediction_type, dtype or torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise ModelError(f"Diffusers folder {source} cannot be loaded ({error}); it is incomplete.") from None
    return load_checkpoint(source, family, prediction_type, dtype, models_dir)


# --- the model store ------------------------------------------------------------------------------------


def create_model(store: ModelStore, name: str, source: str | Path, family: str | None = None,
                 prediction_type: str | None = None) -> ModelDir:
    """Create model `name` in the store from a checkpoint or diffusers folder: working/ + db_config.json."""
    from ..config import TrainingConfig
    from .components import uses_zero_terminal_snr

    model = store.model(name)
    if model.exists():
        raise ModelError(f"Model {name!r} already exists in {model.root.parent}; delete it or choose another name.")
    if family is not None:
        get_family(family)
    # the file's own precision: lossless, and a half-precision SDXL file needs 7 GiB of RAM here, not 14 (on a
    # 24 GiB CPU machine the fp32 copy did not fit beside the web UI's loaded model); training loads it in fp32
    components = load_source(source, family, prediction_type, dtype=None, models_dir=store.layout.models_dir)
    save_components(components, model.working)
    config = TrainingConfig(model_name=name, base_checkpoint=str(source),
                            **components.model_family.config_defaults(components.prediction_type,
                                                                      uses_zero_terminal_snr(components)))
    model.save_config(config)
    return model
