"""SD3 / SD 3.5 LoRA files against the loaders of A1111 1.10.1, Forge, ComfyUI and SD.Next (rules restated in
sd3_loader_rules.py), on the tiny model and on the real layouts (meta tensors) of SD3 Medium, SD 3.5 Medium and
Large; and the files' exactness: applied as the loaders apply them, they change the weights as training did."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import sd3_loader_rules as rules
import torch

from dreambooth.config.schema import TrainingConfig
from dreambooth.families.sd3 import SD3
from dreambooth.models.export import model_to_ldm
from dreambooth.models.tiny import tiny_components
from dreambooth.train import lora

VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")


@functools.cache
def trained(key_format: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """The tiny SD3 model with random LoRA factors on the transformer and both CLIPs, and its LoRA file's tensors."""
    components = tiny_components("sd3", seed=0, optional_encoders=False)
    config = TrainingConfig(model_family="sd3", prediction_type="flow_matching", method="lora", lora_rank=2,
                            lora_alpha=3.0, train_text_encoder=True, lora_key_format=key_format)
    torch.manual_seed(1)
    lora.add_lora(components, config)
    with torch.no_grad():
        for model in lora.model_parts(components).values():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_()
    return components, lora.host_tensors(components, key_format)


@functools.cache
def base_weights() -> dict[str, torch.Tensor]:
    """The tiny model's single-file weights before any LoRA."""
    return model_to_ldm(tiny_components("sd3", seed=0, optional_encoders=False))


def model_keys(components: Any) -> list[str]:
    return list(base_weights())


def layer_names(components: Any) -> tuple[list[str], list[str], list[str]]:
    encoders = components.text_encoders
    return ([name for name, _ in components.denoiser.named_modules()],
            [name for name, _ in encoders[0].named_modules()], [name for name, _ in encoders[1].named_modules()])


def check_original(tensors: dict[str, torch.Tensor], keys: list[str], depth: int) -> None:
    """A1111 1.10, Forge and ComfyUI match every transformer key; SD.Next refuses the file (it needs alphas)."""
    transformer = [key for key in tensors if key.startswith("lora_unet_")]
    assert transformer and all(key.count(".") >= 2 for key in tensors)
    a1111 = rules.a1111_matches(tensors, rules.a1111_layers(keys), depth)
    assert set(transformer) <= set(a1111)
    comfy = rules.comfy_matches(tensors, rules.comfy_key_map(keys, depth))
    forge = rules.comfy_matches(tensors, rules.comfy_key_map(keys, depth, forge=True))
    assert set(comfy) == set(forge) == set(tensors)
    with pytest.raises(rules.LoadFailure, match="alpha"):
        rules.sdnext_matches(tensors, set())


def test_original_format_tiny(tmp_path: Any) -> None:
    components, tensors = trained("original")
    check_original(tensors, model_keys(components), 2)
    text = [key for key in tensors if key.startswith("lora_te")]
    assert text and not set(text) & set(rules.a1111_matches(tensors, rules.a1111_layers(model_keys(components)), 2))


def test_diffusers_format_tiny() -> None:
    """SD.Next and ComfyUI match every key; A1111 1.10 only the image stream's attention; Forge none."""
    components, tensors = trained("diffusers")
    keys = model_keys(components)
    assert set(rules.sdnext_matches(tensors, rules.sdnext_layers(*layer_names(components)))) == set(tensors)
    assert set(rules.comfy_matches(tensors, rules.comfy_key_map(keys, 2))) == set(tensors)
    a1111 = rules.a1111_matches(tensors, rules.a1111_layers(keys), 2)
    assert {rules.layer_of(key).rsplit(".", 1)[-1] for key in a1111 if key.startswith("transformer.")} == {
        "to_q", "to_k", "to_v", "0"} and not any(".attn2." in key or "add_" in key for key in a1111)
    assert not rules.comfy_matches([k for k in tensors if k.startswith("transformer.")],
                                   rules.comfy_key_map(keys, 2, forge=True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_format_real_layouts(variant: str) -> None:
    from diffusers import SD3Transformer2DModel

    config = SD3.variant_configs()[variant]
    with torch.device("meta"):
        denoiser = SD3Transformer2DModel.from_config(config)
    targets = SD3.denoiser_lora_targets(denoiser, False)
    modules = dict(denoiser.named_modules())
    factors = {name: (torch.zeros(1, modules[name].in_features), torch.zeros(modules[name].out_features, 1))
               for name in targets}
    tensors = SD3.denoiser_lora_tensors(factors, denoiser, "original")
    keys = list(SD3.denoiser_to_original(denoiser.state_dict(), denoiser.config))
    check_original(tensors, keys, config["num_layers"])
    diffusers = SD3.denoiser_lora_tensors(factors, denoiser, "diffusers")
    layers = {f"lora_transformer_{rules.underscored(name)}" for name in modules}
    assert set(rules.sdnext_matches(diffusers, layers)) == set(diffusers)
    assert set(rules.comfy_matches(diffusers, rules.comfy_key_map(keys, config["num_layers"]))) == set(diffusers)


def _apply(weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], key_map: dict[str, str],
           slices: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Add up @ down of each layer to the weight it lands on (the rows of its slice for a diffusers q/k/v)."""
    patched = {key: value.clone() for key, value in weights.items()}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        layer = rules.layer_of(key)
        change = tensors[f"{layer}.lora_up.weight"] @ tensors[key]
        start, rows = slices.get(layer, (0, change.shape[0]))
        patched[key_map[layer]][start:start + rows] += change
    return patched


@pytest.mark.parametrize("key_format", ["original", "diffusers"])
def test_files_change_the_weights_as_training_did(key_format: str) -> None:
    components, tensors = trained(key_format)
    base = base_weights()
    keys = list(base)
    key_map = rules.comfy_key_map(keys, 2)
    slices = {}
    for diffusers, original in rules.comfy_mmdit_attention(2).items():
        third = diffusers.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
        if third and f"model.diffusion_model.{original}.weight" in base:
            rows = base[f"model.diffusion_model.{original}.weight"].shape[0] // 3
            index = ("q", "k", "v").index(diffusers.rsplit(".", 1)[-1].replace("add_", "").replace("to_", "")[0])
            slices[f"transformer.{diffusers}"] = (index * rows, rows)
    patched = _apply(base, tensors, key_map, slices)
    components = copy.deepcopy(components)  # the cached model stays adapted for the other tests
    lora.merge_lora(components)
    merged = model_to_ldm(components)
    for key in merged:
        torch.testing.assert_close(patched[key], merged[key], rtol=1e-5, atol=1e-5)
