"""Merge LoRAs into a model's weights, or into one LoRA.

Into a model: every LoRA's change is computed against the original weight and the changes are summed,
as A1111 1.10 does for several `<lora:name:w>` at once (change = w * alpha/rank * up @ down; a DoRA
layer rescales the changed weight by dora_scale over its per-input-column norm; `.diff` layers add as
they are). Into one LoRA: the factors are concatenated (rank = sum of ranks, exact), or the summed
change is re-factored by SVD to a fixed or dynamic rank.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelError
from ..train import lora as lora_training
from .extract import RankRule
from .read import KeyTable, LoraFile, LoraModule
from .report import RetainedReport
from .resize import resize_module

Weighted = list[tuple[LoraFile, float]]


def dora_change(change: torch.Tensor, weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """The change a DoRA layer makes: (W + change) * dora_scale / column norm of (W + change), minus W."""
    merged = weight + change
    columns = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    columns = columns.reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale.float().reshape(columns.shape) / columns) - weight


def host_change(module: LoraModule, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """One layer's change at `strength`, in the weight's shape, as the host computes it."""
    original = weight.float()
    change = module.delta()
    if change.numel() != original.numel():
        raise ModelError(f"A LoRA layer of shape {tuple(change.shape)} does not fit a weight of shape "
                         f"{tuple(original.shape)}; the LoRA is for another model.")
    change = change.reshape(original.shape)
    if module.dora_scale is not None:
        change = dora_change(change, original, module.dora_scale)
    return change * strength


def _layer(components: Any, table: KeyTable, key: str, name: str) -> torch.nn.Module:
    target = table.targets.get(key)
    if target is None:
        raise ModelError(f"{name}: layer {key} is not in the {components.family} model; the LoRA was made for "
                         "another model family or architecture.")
    return lora_training.model_parts(components)[target.part].get_submodule(target.module)


def merge_into_components(components: Any, loras: Weighted, table: KeyTable) -> int:
    """Add the LoRAs at their weights to the components' weights in place; returns the layers changed.

    One layer at a time (its changes summed in the LoRAs' order, then added): the fp32 changes of every layer
    at once were as large as the model (a full SDXL LoRA: 8 GiB more)."""
    layers: dict[str, torch.nn.Module] = {}
    for lora, _ in loras:  # every layer is found before any weight changes
        for key in lora.modules:
            layers.setdefault(key, _layer(components, table, key, lora.name))
    with torch.no_grad():
        for key, layer in layers.items():
            weight = layer.weight
            changes = [host_change(lora.modules[key], weight, strength) for lora, strength in loras
                       if key in lora.modules]
            total = changes[0]
            for change in changes[1:]:
                total = total + change
            weight.copy_((weight.float() + total).to(weight.dtype))
    return len(layers)


# --- into one LoRA ----------------------------------------------------------------------------------------

def _by_layer(loras: Weighted) -> dict[str, list[tuple[LoraModule, float]]]:
    layers: dict[str, list[tuple[LoraModule, float]]] = {}
    for lora, strength in loras:
        if lora.has_dora:
            raise ModelError(f"{lora.name} has DoRA magnitudes (dora_scale), which do not add up with other "
                             "LoRAs; merge it into a checkpoint instead.")
        for key, module in lora.modules.items():
            layers.setdefault(key, []).append((module, strength))
    return layers


def concatenate(parts: list[tuple[LoraModule, float]]) -> LoraModule:
    """One module whose up @ down is the weighted sum of the parts' changes (scale 1, alpha = total rank)."""
    if any(module.diff is not None for module, _ in parts):
        raise ModelError("A full-difference (.diff) layer cannot be concatenated; merge with a target rank "
                         "(SVD) instead.")
    ups = [module.up.float() * (strength * module.scale) for module, strength in parts]
    downs = [module.down.float() for module, _ in parts]
    if len({down.shape[1:] for down in downs}) > 1:
        raise ModelError("The LoRAs' layers have different kernel shapes; merge with a target rank (SVD) instead.")
    down = torch.cat(downs, dim=0)
    return LoraModule(down=down, up=torch.cat(ups, dim=1), alpha=float(down.shape[0]))


def _summed(parts: list[tuple[LoraModule, float]]) -> LoraModule:
    if all(module.diff is None for module, _ in parts):
        return concatenate(parts)
    return LoraModule(diff=sum(module.delta() * strength for module, strength in parts))


def merge_loras(loras: Weighted, rule: RankRule | None = None) -> tuple[LoraFile, RetainedReport | None]:
    """One LoRA applying all `loras` at their weights: concatenated ranks, or re-factored to `rule`'s rank."""
    if not loras:
        raise ModelError("No LoRA to merge; choose at least one.")
    layers = _by_layer(loras)
    if rule is None:
        return LoraFile({key: concatenate(parts) for key, parts in layers.items()}, {}, "merged"), None
    rule.check("rank")
    report = RetainedReport()
    modules: dict[str, LoraModule] = {}
    with torch.no_grad():
        for key, parts in layers.items():
            modules[key], kept, total = resize_module(_summed(parts), rule)
            report.add(key, modules[key].rank, kept, total)
    return LoraFile(modules, {}, "merged"), report
