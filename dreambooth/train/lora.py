"""LoRA training through peft, and export in the key format A1111 1.10 and Forge load.

Injection: peft LoRA layers on the UNet's attention blocks (and, with a conv rank, LoCon on the
3x3 convolutions of its resnets and samplers) and on the text encoders' attention and MLP layers.

Export: `lora_unet_…`/`lora_te…_` keys with `.lora_down.weight`, `.lora_up.weight` and an `.alpha`
tensor equal to peft's scaling x rank, so weight 1.0 in the host applies exactly the trained
strength (the host scales by alpha/rank read from the tensor; `ss_network_alpha` is only shown).
DoRA cannot be written as lora_down/lora_up: A1111 1.10 reads a `dora_scale`, but normalises the
merged weight per input column while peft's DoRA normalises per output row, so no dora_scale
reproduces peft's result. DoRA layers are therefore exported exactly as weight differences (`.diff`,
the LyCORIS "full" module A1111 also loads): correct at weight 1.0, but as large as those layers.

`apply_host_lora` reads such a file with the host's own name matching (lora_keys) and merges it into
plain components, which is how the tests prove the files load as trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..atomic import save_safetensors
from ..config.schema import TrainingConfig, base_checkpoint_name
from ..errors import ConfigError, ModelError, TrainingError
from ..families import get_family
from ..families.base import DENOISER_PART
from ..families.sizes import text_lora_targets, unet_lora_targets
from ..models.components import uses_zero_terminal_snr
from . import lora_fuse, lora_keys
from .runtime import text_parts

ADAPTER = "default"
PART_NAMES = (DENOISER_PART, "text_encoder", "text_encoder_2")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Fraction of the LoRA's change that may be lost to rounding before the export warns.
PRECISION_WARNING_FRACTION = 0.5
# LoCon conv names: resnet conv1/conv2, down/upsampler conv. peft matches rank/alpha patterns as the
# last dotted name parts (0.13: '.*\.key$', 0.21: '(.*\.)?key$'), so plain suffixes work in both.
CONV_PATTERN_SUFFIXES = ("conv1", "conv2", "conv")


class PrecisionWarning(UserWarning):
    """The chosen save precision rounds away much of what training changed."""


# --- injection -----------------------------------------------------------------------------------------

def model_parts(components: Any) -> dict[str, Any]:
    """The models of `components` LoRA may adapt, by part name: the denoiser ('unet', whatever its class) and
    each trainable text encoder ('text_encoder', 'text_encoder_2'; SD3's T5 is never adapted)."""
    return {DENOISER_PART: components.denoiser, **dict(text_parts(components, trainable_only=True))}


def unet_target_names(unet: Any, with_conv: bool) -> list[str]:
    """Linear and 1x1 conv layers of the attention blocks; with LoCon also the 3x3 convs of the resnets
    and samplers (the rule lives with the families, which the memory estimate reads too)."""
    return unet_lora_targets(unet, with_conv)


def text_encoder_target_names(encoder: Any) -> list[str]:
    return text_lora_targets(encoder)


def peft_config(config: TrainingConfig, targets: list[str], conv_targets: bool) -> Any:
    from peft import LoraConfig

    patterns = {"rank_pattern": {}, "alpha_pattern": {}}
    if conv_targets:
        patterns = {"rank_pattern": dict.fromkeys(CONV_PATTERN_SUFFIXES, config.lora_conv_rank),
                    "alpha_pattern": dict.fromkeys(CONV_PATTERN_SUFFIXES, config.lora_conv_alpha)}
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, use_dora=config.use_dora, init_lora_weights=True, bias="none",
                      **patterns)


def _check_lora_settings(config: TrainingConfig) -> None:
    get_family(config.model_family).check_lora_settings(config)
    if not (config.train_unet or config.train_text_encoder):
        raise ConfigError("Settings 'train_unet' and 'train_text_encoder' are both off: a LoRA needs at least "
                          "one of them; turn one on.")
    if config.lora_rank < 1:
        raise ConfigError(f"Setting 'lora_rank' is {config.lora_rank}; use 1 or more (4-32 is typical).")


def add_lora(components: Any, config: TrainingConfig) -> dict[str, list[torch.nn.Parameter]]:
    """Inject peft LoRA layers and freeze everything else; returns the trainable parameters by part.

    Every part of the model is a key ('unet', 'text_encoder' and for SDXL 'text_encoder_2'); parts
    that are not trained map to an empty list.
    """
    from peft import inject_adapter_in_model

    _check_lora_settings(config)
    for module in components.modules():
        module.requires_grad_(False)
    params: dict[str, list[torch.nn.Parameter]] = {}
    for part, model in model_parts(components).items():
        params[part] = []
        if _part_is_trained(part, config):
            with_conv = part == DENOISER_PART and config.lora_conv_rank > 0
            targets = components.model_family.lora_target_names(part, model, with_conv)
            inject_adapter_in_model(peft_config(config, targets, with_conv), model, adapter_name=ADAPTER)
            params[part] = _unfreeze_adapter(model)
    return params


def _part_is_trained(part: str, config: TrainingConfig) -> bool:
    return config.train_unet if part == DENOISER_PART else config.train_text_encoder


def _unfreeze_adapter(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = []
    for name, param in model.named_parameters():
        is_adapter = "lora_" in name
        param.requires_grad_(is_adapter)
        if is_adapter:
            params.append(param)
    return params


def lora_modules(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(module name, peft LoRA layer) for every layer that carries our adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


# --- training state (snapshots) ------------------------------------------------------------------------

def lora_state(components: Any) -> dict[str, torch.Tensor]:
    """The adapter weights only (LoRA A/B, DoRA magnitudes), keyed '<part>.<parameter name>'."""
    state = {}
    for part, model in model_parts(components).items():
        for name, param in model.named_parameters():
            if "lora_" in name:
                state[f"{part}.{name}"] = param.detach().clone()
    return state


def load_lora_state(components: Any, state: dict[str, torch.Tensor]) -> None:
    """Load what lora_state returned into components prepared by add_lora with the same settings."""
    expected = lora_state(components)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TrainingError(f"The snapshot's LoRA weights do not fit this model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); the LoRA settings (rank, conv rank, DoRA, trained "
                            "parts) changed since it was saved: restore them or start a new run.")
    parts = model_parts(components)
    with torch.no_grad():
        for key, value in state.items():
            part, name = key.split(".", 1)
            target = parts[part].get_parameter(name)
            if target.shape != value.shape:
                raise TrainingError(f"The snapshot's LoRA weight {key} has shape {tuple(value.shape)}, the model "
                                    f"{tuple(target.shape)}: the LoRA rank changed since it was saved.")
            target.copy_(value)


# --- merge ---------------------------------------------------------------------------------------------

def merge_lora(components: Any) -> None:
    """Merge the adapters into the base weights and remove the peft layers (peft merge_and_unload)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in model_parts(components).values():
        wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        for name, module in wrapped:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
        if wrapped and hasattr(model, "peft_config"):
            del model.peft_config


# --- export --------------------------------------------------------------------------------------------

def _dora_difference(module: Any) -> torch.Tensor:
    """W_merged - W of a DoRA layer, merged by peft itself on a copy of the layer."""
    difference = lora_fuse.layer_factors(module, ADAPTER).diff
    assert difference is not None
    return difference


def _module_tensors(key: str, module: Any, alpha_key: bool = True) -> dict[str, torch.Tensor]:
    """The layer's file tensors: down, up and alpha (the host applies alpha / rank), or with `alpha_key` False
    down and the up weights times the strength (loaders then apply scale 1)."""
    if module.use_dora.get(ADAPTER, False):
        return {f"{key}.diff": _dora_difference(module)}
    down = module.lora_A[ADAPTER].weight.detach().float()
    up = module.lora_B[ADAPTER].weight.detach().float()
    if not alpha_key:
        return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up * module.scaling[ADAPTER]}
    alpha = module.scaling[ADAPTER] * down.shape[0]
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha, dtype=torch.float32)}


def denoiser_keys(components: Any, names: list[str]) -> dict[str, str]:
    """The exported key of each adapted denoiser module: the family's, or kohya's UNet keys."""
    denoiser = components.denoiser
    keys = components.model_family.denoiser_lora_keys(names, denoiser)
    if keys is not None:
        return keys
    ldm_names = lora_keys.unet_ldm_names(denoiser, components.family)
    return {name: lora_keys.unet_key(components.family, name, ldm_names[name]) for name in names}


def _factors(modules: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up x strength) of each LoRA layer: the change it makes is up @ down."""
    return {name: (module.lora_A[ADAPTER].weight.detach().float(),
                   module.lora_B[ADAPTER].weight.detach().float() * module.scaling[ADAPTER])
            for name, module in modules.items()}


def host_tensors(components: Any, key_format: str = "original") -> dict[str, torch.Tensor]:
    """All adapters as fp32 tensors under the host's key names (`key_format`: 'lora_key_format')."""
    tensors: dict[str, torch.Tensor] = {}
    family = components.model_family
    encoder_index = {spec.folder: index for index, spec in enumerate(family.text_encoders)}
    for part, model in model_parts(components).items():
        modules = dict(lora_modules(model))
        slots = family.denoiser_lora_slots(model) if part == DENOISER_PART and key_format == "original" else None
        fused = None
        if slots is not None:  # the host fuses layers: one LoRA per fused layer (train/lora_fuse.py)
            fused = lora_fuse.host_tensors({name: lora_fuse.layer_factors(module, ADAPTER)
                                            for name, module in modules.items()}, slots, str)
        elif part == DENOISER_PART and modules:
            fused = family.denoiser_lora_tensors(_factors(modules), components.denoiser, key_format)
        if fused is not None:
            tensors.update(fused)
            continue
        if part == DENOISER_PART:
            keys = denoiser_keys(components, list(modules))
        else:
            keys = {name: lora_keys.te_key(components.family, encoder_index[part], name) for name in modules}
        for name, module in modules.items():
            tensors.update(_module_tensors(keys[name], module, components.model_family.lora_alpha_keys))
    return tensors


def _delta(tensors: dict[str, torch.Tensor], base: str) -> torch.Tensor:
    if f"{base}.diff" in tensors:
        return tensors[f"{base}.diff"].float()
    up, down = tensors[f"{base}.lora_up.weight"].float(), tensors[f"{base}.lora_down.weight"].float()
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def _part_of_key(key: str) -> str:
    return key.split("_text_model", 1)[0] if "_text_model" in key else DENOISER_PART


def lost_fraction(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Worst share, over the UNet and each text encoder, of the weight change (norm of all up@down
    or diffs) that casting to `dtype` loses."""
    cast = {key: value.to(dtype) for key, value in tensors.items()}
    lost: dict[str, float] = {}
    total: dict[str, float] = {}
    for base in {key.split(".", 1)[0] for key in tensors if not key.endswith(".alpha")}:
        exact, part = _delta(tensors, base), _part_of_key(base)
        lost[part] = lost.get(part, 0.0) + float((_delta(cast, base) - exact).pow(2).sum())
        total[part] = total.get(part, 0.0) + float(exact.pow(2).sum())
    return max(((lost[part] / total[part]) ** 0.5 if total[part] > 0 else 0.0 for part in total), default=0.0)


def cast_for_save(tensors: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """Cast to the save precision (alphas stay fp32, they are single exact numbers); warn on big losses."""
    dtype = PRECISIONS[precision]
    fraction = lost_fraction(tensors, dtype) if dtype != torch.float32 else 0.0
    if fraction > PRECISION_WARNING_FRACTION:
        warnings.warn(f"Saving the LoRA in {precision} loses {fraction:.0%} of what training changed; "
                      "set 'save_precision' to fp32.", PrecisionWarning, stacklevel=3)
    return {key: value if key.endswith(".alpha") else value.to(dtype).contiguous() for key, value in tensors.items()}


def addnet_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the safetensors data section (what A1111 and kohya call the addnet/sshs hash).

    The data section does not depend on the header's metadata, so it is hashed before metadata exists.
    """
    from safetensors.torch import save

    blob = save(tensors)
    header_length = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_length:]).hexdigest()


def settings_hash(config: TrainingConfig) -> str:
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _network_args(config: TrainingConfig) -> dict[str, str]:
    args: dict[str, str] = {}
    if config.lora_conv_rank > 0:
        args.update(conv_dim=str(config.lora_conv_rank), conv_alpha=str(config.lora_conv_alpha))
    if config.use_dora:
        args.update(dora="true", dora_export="diff")
    if config.lora_dropout:
        args["dropout"] = str(config.lora_dropout)
    return args


def default_metadata(components: Any, config: TrainingConfig) -> dict[str, str]:
    """ss_* metadata A1111's LoRA cards show, from the settings (the trainer adds run facts)."""
    resolution = config.resolution
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(config.lora_rank),
        "ss_network_alpha": str(config.lora_alpha), "ss_network_dropout": str(config.lora_dropout),
        **get_family(components.family).lora_markers(components.prediction_type,
                                                     uses_zero_terminal_snr(components)),
        "ss_sd_model_name": base_checkpoint_name(config) or config.model_name,
        "ss_resolution": f"({resolution}, {resolution})", "ss_max_train_steps": str(config.max_train_steps),
        "ss_learning_rate": str(config.learning_rate), "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr), "ss_mixed_precision": config.mixed_precision,
        "ss_clip_skip": str(config.clip_skip), "ss_seed": str(config.seed), "ss_lr_scheduler": config.lr_scheduler,
        "ss_optimizer": config.optimizer, "ss_noise_offset": str(config.offset_noise),
        "ss_min_snr_gamma": str(config.min_snr_gamma), "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_training_comment": "trained with the dreambooth extension", "dreambooth_settings_hash": settings_hash(config),
    }
    if _network_args(config):
        metadata["ss_network_args"] = json.dumps(_network_args(config))
    if len(get_family(components.family).text_encoders) > 1:
        metadata["ss_text_encoder_2_lr"] = str(config.text_encoder_2_lr)
    return metadata


def unique_output_name(base: str, tensor_hash: str) -> str:
    """The alias the host lists the file under: two files with one alias make it render the base image."""
    suffix = tensor_hash[:8]
    return base if base.endswith(f"_{suffix}") else f"{base}_{suffix}"


def build_metadata(components: Any, config: TrainingConfig, out_path: Path, metadata: dict[str, str],
                   tensor_hash: str) -> dict[str, str]:
    merged = {**default_metadata(components, config), **{key: str(value) for key, value in metadata.items()}}
    merged["ss_output_name"] = unique_output_name(merged.get("ss_output_name") or out_path.stem, tensor_hash)
    merged["sshs_model_hash"] = tensor_hash
    return merged


def export_lora(components: Any, config: TrainingConfig, out_path: Path, metadata: dict[str, str]) -> Path:
    """Write the adapters as one .safetensors the host loads at the trained strength (atomic write).

    `metadata` adds or overrides ss_* entries (ss_steps, ss_training_started_at, ss_num_train_images,
    ss_tag_frequency as JSON, ...); ss_output_name always gets a content hash appended to stay unique.
    """
    out_path = Path(out_path)
    tensors = host_tensors(components, config.lora_key_format)
    if not tensors:
        raise ModelError(f"{out_path}: the model carries no LoRA layers to export; call add_lora first.")
    tensors = cast_for_save(tensors, config.save_precision)
    tensor_hash = addnet_hash(tensors)
    save_safetensors(tensors, out_path, build_metadata(components, config, out_path, metadata, tensor_hash))
    return out_path


# --- the host's loader, reimplemented ------------------------------------------------------------------

@dataclasses.dataclass
class _Group:
    """All tensors of one host module, as A1111's NetworkWeights."""

    layer: lora_keys.HostLayer
    weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    keys: list[str] = dataclasses.field(default_factory=list)


def _group_by_host_module(tensors: dict[str, torch.Tensor], mapping: dict[str, lora_keys.HostLayer],
                          is_sd2: bool) -> tuple[dict[str, _Group], list[str]]:
    groups: dict[str, _Group] = {}
    unmatched: list[str] = []
    for key, value in tensors.items():
        base, _, part = key.partition(".")
        sd_key = lora_keys.resolve_host_key(base, mapping, is_sd2)
        if sd_key is None:
            unmatched.append(key)
            continue
        layer = mapping.get(sd_key) or mapping[re.sub(r"_[qkv]_proj$", "", sd_key)]
        group = groups.setdefault(sd_key, _Group(layer))
        group.weights[part] = value
        group.keys.append(key)
    return groups, unmatched


def _calc_updown(weights: dict[str, torch.Tensor], orig: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The weight change of one module as A1111's NetworkModuleLora/NetworkModuleFull compute it."""
    if "diff" in weights:
        updown, dim = weights["diff"].float(), None
    else:
        up = weights.get("lora_up.weight", weights.get("lora_B.weight"))
        down = weights.get("lora_down.weight", weights.get("lora_A.weight"))
        if up is None or down is None or "lora_mid.weight" in weights:
            raise ModelError(f"LoRA module with keys {sorted(weights)} is not a plain LoRA or full difference.")
        up, down = up.float(), down.float()
        shape = [up.shape[0], down.shape[1], *down.shape[2:]]
        updown, dim = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape), down.shape[0]
    if updown.numel() == orig.numel():
        updown = updown.reshape(orig.shape)
    updown = updown * _host_scale(weights, dim)
    if "dora_scale" in weights:
        updown = _weight_decompose(updown, orig.float(), weights["dora_scale"].float())
    return updown * multiplier


def _host_scale(weights: dict[str, torch.Tensor], dim: int | None) -> float:
    if "scale" in weights:
        return float(weights["scale"].item())
    if dim is not None and "alpha" in weights:
        return float(weights["alpha"].item()) / dim
    return 1.0


def _weight_decompose(updown: torch.Tensor, orig: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """A1111 1.10's DoRA: rescale the merged weight by dora_scale over its per-input-column norm."""
    merged = updown + orig
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (orig.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale / norm) - orig


def _add_to_weight(module: torch.nn.Module, updown: torch.Tensor) -> None:
    module.weight.copy_((module.weight.float() + updown).to(module.weight.dtype))


def _apply_groups(groups: dict[str, _Group], mapping: dict[str, lora_keys.HostLayer], weight: float) -> list[str]:
    """Apply as network_apply_weights does; returns the keys of groups the host would never apply."""
    applied: set[str] = set()
    for name, layer in mapping.items():
        if layer.kind == "plain" and name in groups and hasattr(layer.module, "weight"):
            _add_to_weight(layer.module, _calc_updown(groups[name].weights, layer.module.weight, weight))
            applied.add(name)
        elif layer.kind == "mha":
            applied.update(_apply_fused_attention(name, layer.module, groups, weight))
    return [key for name, group in groups.items() if name not in applied for key in group.keys]


def _apply_fused_attention(name: str, attention: Any, groups: dict[str, _Group], weight: float) -> list[str]:
    """OpenCLIP's nn.MultiheadAttention: the host changes it only when q, k, v and out all come."""
    projections = {"q_proj": attention.q_proj, "k_proj": attention.k_proj, "v_proj": attention.v_proj,
                   "out_proj": attention.out_proj}
    names = {f"{name}_{proj}": module for proj, module in projections.items()}
    if not all(key in groups for key in names):
        return []
    for key, module in names.items():
        _add_to_weight(module, _calc_updown(groups[key].weights, module.weight, weight))
    return list(names)


def apply_host_lora(components: Any, path: Path, weight: float = 1.0) -> list[str]:
    """Merge a LoRA file into plain components the way A1111 1.10 loads it; returns the keys that
    match no module (or that the host would never apply). Empty for every file export_lora writes."""
    from safetensors.torch import load_file

    if any(True for model in model_parts(components).values() for _ in lora_modules(model)):
        raise ModelError("apply_host_lora needs plain components; these carry peft LoRA layers (merge_lora them "
                         "or load fresh ones).")
    mapping = lora_keys.host_layer_mapping(components.family, components.denoiser, list(components.text_encoders))
    groups, unmatched = _group_by_host_module(load_file(str(path)), mapping, lora_keys.host_is_sd2(mapping))
    with torch.no_grad():
        unmatched += _apply_groups(groups, mapping, weight)
    return unmatched


# --- export on demand (service) ------------------------------------------------------------------------

def snapshot_lora_state(snapshot: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter tensors ('<part>.<parameter name>', as lora_state) and the meta of a trainer snapshot."""
    from .snapshots import read_snapshot

    tensors, _, meta = read_snapshot(snapshot)
    return {key: value for key, value in tensors.items() if "lora_" in key}, meta


def export_model_lora(model: Any, config: TrainingConfig, out_path: Path, precision: str) -> Path:
    """Export the LoRA of `model`'s newest snapshot (the trainer writes one at every stop and at the end)
    onto its working weights, in the host's format at `precision`; TrainingError when there is none."""
    from ..models.components import load_components
    from .snapshots import list_snapshots

    found = list_snapshots(model.snapshots)
    if not found:
        raise TrainingError(f"Model {model.name!r} has no training snapshot in {model.snapshots}: train it with "
                            "method 'lora' first, then export the LoRA.")
    state, meta = snapshot_lora_state(found[-1])
    if not state:
        raise TrainingError(f"The newest snapshot {found[-1]} holds no LoRA weights (the last run trained full "
                            "weights); train with method 'lora' first, or export a checkpoint instead.")
    components = load_components(model.working, torch.float32)
    add_lora(components, config)
    load_lora_state(components, state)
    step = str(meta.get("step", ""))
    metadata = {"ss_steps": step, "dreambooth_model": model.name, "dreambooth_step": step,
                "dreambooth_base_checkpoint": base_checkpoint_name(config)}
    return export_lora(components, dataclasses.replace(config, save_precision=precision), out_path, metadata)
