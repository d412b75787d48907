"""Create a trainable model from an original single-file checkpoint or a diffusers folder, offline.

UNet and VAE are read by diffusers' own single-file converters with the component configs shipped in
`dreambooth/resources/configs/<family>/` (or, for tiny demo files, the configs embedded in the file's
metadata), so nothing is fetched from the hub. `.ckpt` files are read with torch's weights-only
unpickler: a pickle that tries to run code is refused, never executed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json
from ..errors import ModelError
from ..store import ModelDir, ModelStore
from .components import (
    FAMILIES,
    PAD_TOKENS,
    PREDICTION_TYPES,
    RESOLUTIONS,
    Components,
    check_family,
    load_components,
    make_noise_scheduler,
    save_components,
)
from .convert import (
    CLIP_L_PREFIXES,
    OPEN_CLIP_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    ldm_to_clip_l,
    ldm_to_open_clip,
    match_model_keys,
    normalise_clip_l_keys,
)
from .tokenizer import load_clip_tokenizer, load_tokenizer_folder

CONFIG_DIR = Path(__file__).resolve().parent.parent / "resources" / "configs"
CONFIGS_METADATA_KEY = "dreambooth_configs"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
COMPONENT_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")

# --- reading files -------------------------------------------------------------------------------------


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


def _has_prefix(keys: Any, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def detect_family(state_dict: Mapping[str, Any]) -> str:
    """'sd1', 'sd2' or 'sdxl' from the keys of an original checkpoint (SD2's v-prediction is not in the keys)."""
    keys = list(state_dict)
    if not _has_prefix(keys, UNET_PREFIX) or not _has_prefix(keys, VAE_PREFIX):
        raise ModelError("The file is not a Stable Diffusion checkpoint (no UNet or VAE weights in the original "
                         "layout); LoRA, embedding and VAE-only files cannot be trained as a model.")
    if _has_prefix(keys, OPEN_CLIP_PREFIXES["sdxl"]) and _has_prefix(keys, CLIP_L_PREFIXES["sdxl"]):
        return "sdxl"
    if _has_prefix(keys, OPEN_CLIP_PREFIXES["sd2"]):
        return "sd2"
    if _has_prefix(keys, CLIP_L_PREFIXES["sd1"]):
        return "sd1"
    raise ModelError("The checkpoint has no text encoder this tool knows (SD1 CLIP-L, SD2 OpenCLIP or SDXL's "
                     "two); only SD 1.x, 2.x and SDXL base checkpoints are supported.")


def _yaml_says_v(path: Path) -> bool | None:
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(encoding="utf-8", errors="replace")
    return any(line.split("#")[0].replace(" ", "").replace("'", '"') in ('parameterization:"v"', "parameterization:v")
               for line in text.splitlines())


def _metadata_prediction(metadata: Mapping[str, str]) -> str | None:
    if metadata.get("dreambooth_prediction_type") in ("epsilon", "v_prediction"):
        return metadata["dreambooth_prediction_type"]
    spec = metadata.get("modelspec.prediction_type", "")
    return {"v": "v_prediction", "epsilon": "epsilon"}.get(spec)


def resolve_family(path: Path, detected: str, metadata: Mapping[str, str], family: str | None,
                   prediction_type: str | None) -> tuple[str, str]:
    """Family and prediction type: what the file tells (yaml beside it, metadata), else the caller's choice."""
    if family is not None:
        check_family(family)
        if family.rstrip("v") != detected:
            raise ModelError(f"Checkpoint {path} is a {detected} model, not {family}; choose the detected family.")
    if detected != "sd2":
        return detected, prediction_type or PREDICTION_TYPES[detected]
    from_yaml = _yaml_says_v(path)
    told = _metadata_prediction(metadata) or ({True: "v_prediction", False: "epsilon"}.get(from_yaml)
                                              if from_yaml is not None else None)
    prediction = told or prediction_type or ("v_prediction" if family == "sd2v" else "epsilon")
    return ("sd2v" if prediction == "v_prediction" else "sd2"), prediction


# --- configs --------------------------------------------------------------------------------------------


def embedded_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]] | None:
    raw = metadata.get(CONFIGS_METADATA_KEY)
    return json.loads(raw) if raw else None


def write_config_dir(configs: Mapping[str, Mapping[str, Any]], folder: Path) -> Path:
    for name, config in configs.items():
        write_json(folder / name / "config.json", dict(config))
    return folder


def shipped_configs(family: str) -> dict[str, dict[str, Any]]:
    """The full-size component configs shipped for `family`."""
    folder = CONFIG_DIR / check_family(family)
    return {name: json.loads((folder / name / "config.json").read_text()) for name in COMPONENT_NAMES
            if (folder / name / "config.json").is_file()}


# --- components from a state dict -----------------------------------------------------------------------


def _text_encoder_weights(state: Mapping[str, torch.Tensor], family: str,
                          configs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
    if family == "sd1":
        return [ldm_to_clip_l(state, CLIP_L_PREFIXES["sd1"])]
    layers = int(configs["text_encoder" if family != "sdxl" else "text_encoder_2"]["num_hidden_layers"])
    if family in ("sd2", "sd2v"):
        return [ldm_to_open_clip(state, OPEN_CLIP_PREFIXES["sd2"], layers, with_projection=False)]
    return [ldm_to_clip_l(state, CLIP_L_PREFIXES["sdxl"]),
            ldm_to_open_clip(state, OPEN_CLIP_PREFIXES["sdxl"], layers, with_projection=True)]


def load_text_encoder(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], with_projection: bool,
                      dtype: torch.dtype) -> Any:
    """A transformers CLIP text model holding exactly `weights` (created empty, then filled)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with init_empty_weights():
        model = cls(CLIPTextConfig.from_dict(dict(config)))
    matched = match_model_keys(weights, model.state_dict().keys())
    missing = [name for name, param in model.named_parameters() if name not in matched]
    if missing:
        raise ModelError(f"The checkpoint's text encoder lacks {len(missing)} weights (e.g. {missing[0]}); "
                         "the file is incomplete or of another architecture.")
    model.load_state_dict({key: value for key, value in matched.items() if key in dict(model.named_parameters())},
                          strict=False, assign=True)
    return _to_dtype(model, dtype).eval()


def _diffusers_model(cls: Any, state: Mapping[str, torch.Tensor], config_dir: Path, name: str,
                     dtype: torch.dtype) -> Any:
    try:
        model = cls.from_single_file(dict(state), config=str(config_dir), subfolder=name, local_files_only=True,
                                     torch_dtype=dtype)
    except Exception as error:
        raise ModelError(f"The checkpoint's {name} does not fit the {config_dir.name} architecture "
                         f"({type(error).__name__}: {str(error)[:200]}); the file is damaged or of another "
                         "model type.") from None
    return _to_dtype(model, dtype).eval()


def _to_dtype(model: Any, dtype: torch.dtype) -> Any:
    return model if next(model.parameters()).dtype == dtype else model.to(dtype)


def components_from_state_dict(state: Mapping[str, torch.Tensor], family: str, prediction_type: str,
                               configs: Mapping[str, Mapping[str, Any]], dtype: torch.dtype = torch.float32
                               ) -> Components:
    """Components from an original-layout state dict; keys the model does not hold become extras."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .export import model_to_ldm

    state = normalise_clip_l_keys(state)
    with tempfile.TemporaryDirectory(prefix="dreambooth-configs-") as tmp:
        config_dir = write_config_dir({k: v for k, v in configs.items() if k in ("unet", "vae")}, Path(tmp))
        unet = _diffusers_model(UNet2DConditionModel, state, config_dir, "unet", dtype)
        vae = _diffusers_model(AutoencoderKL, state, config_dir, "vae", dtype)
    te_names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    weights = _text_encoder_weights(state, family, configs)
    encoders = [load_text_encoder(configs[name], w, name == "text_encoder_2", dtype)
                for name, w in zip(te_names, weights, strict=True)]
    components = Components(family=family, unet=unet, vae=vae, text_encoders=encoders,
                            tokenizers=[load_clip_tokenizer(pad) for pad in PAD_TOKENS[family]],
                            noise_scheduler=make_noise_scheduler(family, prediction_type),
                            prediction_type=prediction_type)
    held = set(model_to_ldm(components))
    components.extras = {key: value for key, value in state.items() if key not in held}
    return components


def load_checkpoint(path: str | Path, family: str | None = None, prediction_type: str | None = None,
                    dtype: torch.dtype = torch.float32) -> Components:
    """Components from an original single-file checkpoint (.safetensors or .ckpt), offline."""
    path = Path(path)
    state, metadata = read_checkpoint(path)
    family, prediction = resolve_family(path, detect_family(state), metadata, family, prediction_type)
    configs = embedded_configs(metadata) or shipped_configs(family)
    return components_from_state_dict(state, family, prediction, configs, dtype)


# --- diffusers folders ----------------------------------------------------------------------------------


def _folder_family(folder: Path, index: Mapping[str, Any]) -> str:
    if "text_encoder_2" in index:
        return "sdxl"
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    return "sd1" if text.get("hidden_act") == "quick_gelu" else "sd2"


def _folder_tokenizers(folder: Path, family: str) -> list[Any]:
    tokenizers = []
    for name, pad in zip(("tokenizer", "tokenizer_2")[:len(PAD_TOKENS[family])], PAD_TOKENS[family], strict=True):
        has_files = (folder / name / "vocab.json").is_file() and (folder / name / "merges.txt").is_file()
        tokenizers.append(load_tokenizer_folder(folder / name) if has_files else load_clip_tokenizer(pad))
    return tokenizers


def load_diffusers_folder(folder: str | Path, family: str | None = None, prediction_type: str | None = None,
                          dtype: torch.dtype = torch.float32) -> Components:
    """Components from a diffusers pipeline folder (ours or any other), local files only."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    if (folder / "family.json").is_file():
        return load_components(folder, dtype)
    index = json.loads((folder / "model_index.json").read_text())
    detected = _folder_family(folder, index)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    prediction = prediction_type or scheduler.get("prediction_type") or "epsilon"
    if detected == "sd2" and (prediction == "v_prediction" or family == "sd2v"):
        detected, prediction = "sd2v", "v_prediction"
    encoders = [getattr(transformers, index[name][1]).from_pretrained(str(folder / name), torch_dtype=dtype,
                                                                        local_files_only=True)
                for name in ("text_encoder", "text_encoder_2") if name in index]
    return Components(
        family=detected,
        unet=UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype, local_files_only=True),
        vae=AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype, local_files_only=True),
        text_encoders=encoders, tokenizers=_folder_tokenizers(folder, detected),
        noise_scheduler=make_noise_scheduler(detected, prediction), prediction_type=prediction)


def load_source(source: str | Path, family: str | None = None, prediction_type: str | None = None,
                dtype: torch.dtype = torch.float32) -> Components:
    """Components from a checkpoint file or a diffusers folder."""
    source = Path(source)
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise ModelError(f"Folder {source} is not a diffusers model (no model_index.json); "
                             "choose a .safetensors/.ckpt file or a diffusers folder.")
        try:
            return load_diffusers_folder(source, family, prediction_type, dtype)
        except (OSError, ValueError, KeyError) as error:
            raise ModelError(f"Diffusers folder {source} cannot be loaded ({error}); it is incomplete.") from None
    return load_checkpoint(source, family, prediction_type, dtype)


# --- the model store ------------------------------------------------------------------------------------


def create_model(store: ModelStore, name: str, source: str | Path, family: str | None = None,
                 prediction_type: str | None = None) -> ModelDir:
    """Create model `name` in the store from a checkpoint or diffusers folder: working/ + db_config.json."""
    from ..config import TrainingConfig

    model = store.model(name)
    if model.exists():
        raise ModelError(f"Model {name!r} already exists in {model.root.parent}; delete it or choose another name.")
    if family is not None and family not in FAMILIES:
        raise ModelError(f"Model family {family!r} is not supported; use one of {', '.join(FAMILIES)}.")
    components = load_source(source, family, prediction_type)
    save_components(components, model.working)
    config = TrainingConfig(model_name=name, base_checkpoint=str(source), model_family=components.family,
                            prediction_type=components.prediction_type, resolution=RESOLUTIONS[components.family])
    model.save_config(config)
    return model
