"""A Flux.1 model's Components from the files its users keep (`flux_files`): a transformer file with its text
encoders and VAE found beside it or in the host's folders, or one all-in-one file. Weights keep the file's
precision (bf16 where it was quantized): the fp32 copy of Flux dev would need 64 GB.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..families import get_family
from . import flux_files
from .components import Components
from .convert import T5_TIED_EMBEDDING, ldm_to_clip_l, match_model_keys
from .loading import CONFIGS_METADATA_KEY, read_safetensors
from .tokenizer import load_t5_tokenizer, missing_t5_tokenizer, t5_search_dirs


def read_parts(files: flux_files.FluxFiles, keep_fp8: tuple[str, ...] = ()
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(role -> its weights in full-precision dtypes, configs embedded in our own files), each file read once.
    A file holding only roles in `keep_fp8`, stored in plain fp8, keeps its fp8 weights."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedded: dict[str, Any] = {}
    for path in dict.fromkeys(files.parts.values()):
        tensors, metadata = read_safetensors(path)
        held = {role for role, where in files.parts.items() if where == path}
        if not (held <= set(keep_fp8) and flux_files.plain_fp8(tensors)):
            tensors = flux_files.full_precision(tensors, str(path))
        roles = flux_files.split_roles(tensors, str(path))
        parts.update({role: state for role, state in roles.items() if files.parts.get(role) == path})
        if CONFIGS_METADATA_KEY in metadata:
            embedded.update(json.loads(metadata[CONFIGS_METADATA_KEY]))
    return parts, embedded


def _loaded(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str, source: Path,
            tied: tuple[str, ...] = ()) -> torch.nn.Module:
    """`model` (built on the meta device) with `weights` put in place; every weight must come from the file."""
    own = dict(model.named_parameters())
    missing = [name for name in own if name not in weights and name not in tied]
    if missing:
        raise ModelError(f"{source}: its {what} lacks {len(missing)} weights (e.g. {missing[0]}); the file is "
                         "incomplete or of another model.")
    model.load_state_dict({key: value for key, value in weights.items() if key in own}, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _build(cls: Any, config: Mapping[str, Any]) -> Any:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(dict(config)) if hasattr(cls, "from_config") else cls(config)


def transformer(state: dict[str, torch.Tensor], config: Mapping[str, Any] | None, source: Path) -> Any:
    import diffusers

    found, weights = flux_files.transformer_weights(state, config)
    return _loaded(_build(diffusers.FluxTransformer2DModel, found), weights, "Flux transformer", source)


def vae(state: dict[str, torch.Tensor], config: Mapping[str, Any], source: Path) -> Any:
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    weights = state if "decoder.conv_in.weight" not in state else convert_ldm_vae_checkpoint(state, dict(config))
    return _loaded(_build(diffusers.AutoencoderKL, config), weights, "VAE (ae)", source)


def clip_l(state: dict[str, torch.Tensor], config: Mapping[str, Any], source: Path) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    model = _build(CLIPTextModel, CLIPTextConfig.from_dict(dict(config)))
    weights = match_model_keys(ldm_to_clip_l(state, ""), model.state_dict().keys())
    return _loaded(model, weights, "CLIP-L text encoder", source)


def t5(state: dict[str, torch.Tensor], config: Mapping[str, Any], source: Path) -> Any:
    from transformers import T5Config, T5EncoderModel

    model = _build(T5EncoderModel, T5Config.from_dict(dict(config)))
    # The released T5 files keep the token embedding once, as `shared.weight`; the encoder's copy is tied to it.
    return _loaded(model, state, "T5-XXL text encoder", source, tied=(T5_TIED_EMBEDDING,))


def t5_tokenizer(source: Path, family: Any) -> Any:
    spec = family.text_encoders[1]
    found = load_t5_tokenizer(source.parent, spec)
    if found is None:
        raise ModelError(missing_t5_tokenizer(t5_search_dirs(source.parent, spec.tokenizer_folder)))
    return found


def load_flux_file(source: str | Path, models_dir: Path | None = None, family: str | None = None,
                   chosen: Mapping[str, Path] | None = None, stored_t5: bool = False) -> Components:
    """Components of the Flux model whose transformer (or all-in-one) file is `source`. With `stored_t5`, a
    T5-XXL file in plain fp8 stays fp8 (a created model's copy: 4.8 GB, not 9.5 GB in bf16; T5 never trains
    and training loads it in its compute dtype)."""
    source = Path(source)
    files = flux_files.find_flux_files(source, models_dir, chosen)
    parts, embedded = read_parts(files, keep_fp8=("t5xxl",) if stored_t5 else ())
    denoiser = transformer(parts["transformer"], embedded.get("transformer"), files.parts["transformer"])
    unit = get_family("flux-dev" if denoiser.config.guidance_embeds else "flux-schnell")
    if family is not None and family != unit.name:
        raise ModelError(f"Checkpoint {source} is a {unit.name} model, not {family}; choose the detected family.")
    configs = {**unit.shipped_configs(), **embedded}
    encoders = [clip_l(parts["clip_l"], configs["text_encoder"], files.parts["clip_l"]),
                t5(parts["t5xxl"], configs["text_encoder_2"], files.parts["t5xxl"])]
    tokenizers = [_clip_tokenizer(unit), t5_tokenizer(source, unit)]
    scheduler = unit.make_noise_scheduler()
    return Components(family=unit.name, denoiser=denoiser, vae=vae(parts["vae"], configs["vae"], files.parts["vae"]),
                      text_encoders=encoders, tokenizers=tokenizers, noise_scheduler=scheduler,
                      prediction_type=unit.prediction_type)


def _clip_tokenizer(unit: Any) -> Any:
    from .tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(unit.text_encoders[0].pad_token)


def load_flux_folder(folder: Path, family: str | None = None) -> Components:
    """Components of a Flux diffusers folder (black-forest-labs' releases, or our working folder), in bf16."""
    import diffusers
    import transformers

    transformer_config = json.loads((folder / "transformer" / "config.json").read_text())
    unit = get_family("flux-dev" if transformer_config.get("guidance_embeds") else "flux-schnell")
    if family is not None and family != unit.name:
        raise ModelError(f"Diffusers folder {folder} is a {unit.name} model, not {family}; choose the detected family.")
    dtype = torch.bfloat16
    load = {"local_files_only": True, "torch_dtype": dtype}
    encoders = [transformers.CLIPTextModel.from_pretrained(str(folder / "text_encoder"), **load),
                transformers.T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"), **load)]
    t5_tokenizer_found = load_t5_tokenizer(folder, unit.text_encoders[1])
    if t5_tokenizer_found is None:
        raise ModelError(missing_t5_tokenizer(t5_search_dirs(folder, unit.text_encoders[1].tokenizer_folder)))
    return Components(family=unit.name,
                      denoiser=diffusers.FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), **load),
                      vae=diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"), **load),
                      text_encoders=encoders, tokenizers=[_clip_tokenizer(unit), t5_tokenizer_found],
                      noise_scheduler=unit.make_noise_scheduler(), prediction_type=unit.prediction_type)
