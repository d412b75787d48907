"""Write a LoraFile in our host format (kohya keys, fp32 alphas) with the ss_* metadata the UIs show."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..atomic import save_safetensors
from ..families import get_family
from ..train import lora as lora_training
from .read import LoraFile, LoraModule


def lora_tensors(lora: LoraFile) -> dict[str, torch.Tensor]:
    """The state dict: `.lora_down.weight`, `.lora_up.weight`, `.alpha` (or `.diff`), and `.dora_scale`."""
    tensors: dict[str, torch.Tensor] = {}
    for key, module in sorted(lora.modules.items()):
        if module.diff is not None:
            tensors[f"{key}.diff"] = module.diff.float().contiguous()
        else:
            tensors[f"{key}.lora_down.weight"] = module.down.float().contiguous()
            tensors[f"{key}.lora_up.weight"] = module.up.float().contiguous()
            alpha = module.alpha if module.alpha is not None else float(module.rank)
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if module.dora_scale is not None:
            tensors[f"{key}.dora_scale"] = module.dora_scale.float().contiguous()
    return tensors


def _factored(lora: LoraFile, conv: bool) -> list[LoraModule]:
    return [module for module in lora.modules.values()
            if module.down is not None and (module.down.dim() == 4 and module.down.shape[-1] > 1) == conv]


def _shared(values: list[float]) -> str:
    """The one value all layers share, 'dynamic' when they differ (kohya's fields hold one number)."""
    if not values:
        return "0"
    return f"{values[0]:g}" if len(set(values)) == 1 else "dynamic"


def lora_metadata(lora: LoraFile, family: str, extra: Mapping[str, object]) -> dict[str, str]:
    """kohya's ss_* fields for a LoRA not made by training (ranks, family, what it was made from)."""
    linear, conv = _factored(lora, conv=False), _factored(lora, conv=True)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": _shared([m.rank for m in linear]),
                "ss_network_alpha": _shared([m.alpha if m.alpha is not None else m.rank for m in linear]),
                **get_family(family).lora_markers(),
                "dreambooth_family": family}
    if conv:
        metadata["ss_network_args"] = json.dumps({"conv_dim": _shared([m.rank for m in conv]),
                                                  "conv_alpha": _shared([m.alpha or m.rank for m in conv])})
    metadata.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in extra.items()})
    return metadata


def save_lora(lora: LoraFile, path: str | Path, family: str, metadata: Mapping[str, object] | None = None,
              precision: str = "fp32") -> Path:
    """Write atomically; ss_output_name gets the content hash appended (the hosts list LoRAs by it)."""
    path = Path(path)
    tensors = lora_training.cast_for_save(lora_tensors(lora), precision)
    tensor_hash = lora_training.addnet_hash(tensors)
    merged = lora_metadata(lora, family, metadata or {})
    merged["ss_output_name"] = lora_training.unique_output_name(path.stem, tensor_hash)
    merged["sshs_model_hash"] = tensor_hash
    save_safetensors(tensors, path, merged)
    return path
