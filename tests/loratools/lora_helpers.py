"""Tiny models and LoRA files for the LoRA-tool tests (made as tests/train/test_lora.py makes them)."""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

from dreambooth.config.schema import TrainingConfig
from dreambooth.loratools.extract import target_layers
from dreambooth.models.tiny import tiny_components
from dreambooth.train import lora

KINDS = {
    "lora": {"lora_rank": 4, "lora_alpha": 2.0},
    "locon": {"lora_rank": 3, "lora_alpha": 6.0, "lora_conv_rank": 2, "lora_conv_alpha": 1.0},
    "dora": {"lora_rank": 2, "lora_alpha": 2.0, "use_dora": True, "lora_conv_rank": 2, "lora_conv_alpha": 2.0},
}


@functools.cache
def _pristine(family: str) -> Any:
    return tiny_components(family, seed=0)


def fresh(family: str) -> Any:
    """A private copy of the tiny model of `family` (building is the slow part, copying is cheap)."""
    pristine = _pristine(family)
    return dataclasses.replace(pristine, denoiser=copy.deepcopy(pristine.denoiser), vae=copy.deepcopy(pristine.vae),
                               text_encoders=[copy.deepcopy(encoder) for encoder in pristine.text_encoders],
                               extras=dict(pristine.extras))


def lora_config(family: str, kind: str) -> TrainingConfig:
    return TrainingConfig(model_family=family, method="lora", save_precision="fp32", model_name="tiny",
                          base_checkpoint="base.safetensors", resolution=64, max_train_steps=1, **KINDS[kind])


def write_trained_lora(family: str, kind: str, path: Path, seed: int = 1) -> Path:
    """A LoRA file of ours with random (non-zero) adapters, as training would leave them."""
    components = fresh(family)
    params = lora.add_lora(components, lora_config(family, kind))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in params.values():
            for param in group:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    lora.export_lora(components, lora_config(family, kind), path, {})
    return path


def all_weights(components: Any) -> dict[str, torch.Tensor]:
    return {f"{part}.{key}": value.detach().clone() for part, model in lora.model_parts(components).items()
            for key, value in model.state_dict().items()}


def assert_same_weights(first: Any, second: Any, atol: float = 1e-5) -> None:
    a, b = all_weights(first), all_weights(second)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol, msg=key)


def add_known_changes(components: Any, rank: int, with_conv: bool, seed: int = 3) -> dict[str, torch.Tensor]:
    """Add a random rank-`rank` change to every target layer; returns our key -> change."""
    generator = torch.Generator().manual_seed(seed)
    changes = {}
    with torch.no_grad():
        for key, (part, name) in target_layers(components, with_conv).items():
            weight = lora.model_parts(components)[part].get_submodule(name).weight
            left = torch.randn(weight.shape[0], rank, generator=generator)
            right = torch.randn(rank, weight[0].numel(), generator=generator)
            change = (0.05 * left @ right).reshape(weight.shape)
            weight.add_(change)
            changes[key] = change
    return changes


def write_transformer_lora(path: Path, seed: int, family: str = "sd3", text: bool = True) -> Any:
    """A LoRA of ours on the tiny SD3 or Flux model (transformer, and its CLIPs with `text`) with random adapters,
    alpha != rank; returns the adapted model (pristine tiny_components(family, seed=0) plus the adapters)."""
    components = tiny_components(family, seed=0, optional_encoders=False)
    config = TrainingConfig(model_family=family, prediction_type="flow_matching", method="lora", lora_rank=2,
                            lora_alpha=3.0, train_text_encoder=text, save_precision="fp32", model_name="tiny")
    params = lora.add_lora(components, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in params.values():
            for param in group:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    lora.export_lora(components, config, path, {})
    return components
