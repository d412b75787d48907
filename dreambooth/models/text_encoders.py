"""Text encoders of single-file checkpoints: transformers models built from their weights, and the separate
text-encoder files a checkpoint without them is used with.

SD3 and SD 3.5 are often kept as a transformer-and-VAE file plus `clip_l.safetensors`, `clip_g.safetensors` and
`t5xxl_fp16.safetensors` (or an fp8 T5) in the host's text-encoder folder: A1111 1.10 keeps them in
`models/CLIP`, Forge in `models/text_encoder`, ComfyUI in `models/clip` or `models/text_encoders`, and
Stability's releases beside the checkpoint in `text_encoders/`. A file is recognised by its keys and widths,
whatever its name: T5 by its encoder blocks, CLIP-L and CLIP-G by the width of their token embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..families.base import ModelFamily, TextEncoder
from .convert import match_model_keys

log = logging.getLogger(__name__)

TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoders", "CLIP", "clip", "Text-encoder")
T5_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
CLIP_PROBES = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")


def load_text_encoder(spec: TextEncoder, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                      dtype: torch.dtype) -> Any:
    """A transformers text model of the spec's class holding exactly `weights` (created empty, then filled)."""
    import transformers
    from accelerate import init_empty_weights

    config_class = transformers.T5Config if spec.layout == "t5" else transformers.CLIPTextConfig
    with init_empty_weights():
        model = getattr(transformers, spec.model_class)(config_class.from_dict(dict(config)))
    weights = dict(weights)
    if spec.identity_projection and "text_projection.weight" not in weights:
        weights["text_projection.weight"] = torch.eye(int(config["hidden_size"]))
    matched = match_model_keys(weights, model.state_dict().keys())
    parameters = dict(model.named_parameters())
    missing = [name for name in parameters if name not in matched]
    if missing:
        raise ModelError(f"The checkpoint's text encoder ({spec.folder}) lacks {len(missing)} weights (e.g. "
                         f"{missing[0]}); the file is incomplete or of another architecture.")
    model.load_state_dict({key: value for key, value in matched.items() if key in parameters}, strict=False,
                          assign=True)
    if spec.layout == "t5":
        model.encoder.set_input_embeddings(model.shared)  # tied: the stack reads the shared embedding
    return (model if next(model.parameters()).dtype == dtype else model.to(dtype)).eval()


# --- separate text-encoder files ------------------------------------------------------------------------------

def text_encoder_folders(checkpoint: Path, models_dir: Path | None) -> list[Path]:
    """Where separate text-encoder files are looked for: beside the checkpoint (and its `text_encoders/`), then
    the host's text-encoder folders."""
    folders = [checkpoint.parent / "text_encoders", checkpoint.parent]
    if models_dir is not None:
        folders += [models_dir / name for name in TEXT_ENCODER_FOLDERS]
    return [folder for folder in dict.fromkeys(folders) if folder.is_dir()]


def file_kind(path: Path) -> tuple[str, int] | None:
    """('t5', width) or ('clip', width) of a separate text-encoder file, from its header; None for other files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
            if T5_PROBE in keys:
                return "t5", int(handle.get_slice(T5_PROBE).get_shape()[1])
            probe = next((key for key in CLIP_PROBES if key in keys), None)
            return None if probe is None else ("clip", int(handle.get_slice(probe).get_shape()[1]))
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not a text encoder of ours
        return None


def _wanted_kind(spec: TextEncoder, config: Mapping[str, Any]) -> tuple[str, int]:
    if spec.layout == "t5":
        return "t5", int(config["d_model"])
    return "clip", int(config["hidden_size"])


def find_text_encoder_file(spec: TextEncoder, config: Mapping[str, Any], folders: list[Path]) -> Path | None:
    wanted = _wanted_kind(spec, config)
    for folder in folders:
        for path in sorted(folder.glob("*.safetensors")):
            if file_kind(path) == wanted:
                return path
    return None


def _holds(state: Mapping[str, Any], spec: TextEncoder) -> bool:
    return any(key.startswith(spec.ldm_prefix) for key in state)


def with_separate_text_encoders(state: Mapping[str, torch.Tensor], family: ModelFamily,
                                configs: Mapping[str, Mapping[str, Any]], folders: list[Path],
                                source: str) -> dict[str, torch.Tensor]:
    """`state` plus, under the family's keys, each text encoder it lacks read from a separate file. A missing
    required encoder is an error naming the folders searched; a missing optional one (T5) is left out."""
    from safetensors.torch import load_file

    combined = dict(state)
    for spec in family.text_encoders:
        if _holds(state, spec):
            continue
        found = find_text_encoder_file(spec, configs[spec.folder], folders)
        if found is not None:
            log.info("%s: text encoder %s read from %s", source, spec.folder, found)
            combined.update({spec.ldm_prefix + key: value for key, value in load_file(str(found)).items()})
        elif not spec.optional:
            kind, width = _wanted_kind(spec, configs[spec.folder])
            places = ", ".join(str(folder) for folder in folders) or "no text-encoder folder"
            raise ModelError(f"{source} holds no {spec.ldm_prefix.split('.')[1]} text encoder and none of {places} "
                             f"holds one (a {kind.upper()} text model of width {width} in a .safetensors file); "
                             "put it into the host's text-encoder folder or use a checkpoint that includes it.")
    return combined
