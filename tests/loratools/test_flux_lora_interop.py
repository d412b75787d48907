"""Flux.1 LoRA files in kohya's format, as Forge and ComfyUI (their rules restated in flux_loader_rules.py) and
diffusers' own loader (what SD.Next and diffusers pipelines read Flux LoRAs with) take them.

Adapters on diffusers' split layers (to_q, to_k, to_v, proj_mlp) are written onto the fused original layers
(qkv, linear1) as one block-diagonal LoRA; every key must be matched, land on the right weight and rows, and
reproduce at strength 1 exactly what the adapters change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flux_loader_rules as rules
import pytest
import torch
from accelerate import init_empty_weights

from dreambooth.families import flux_names
from dreambooth.train import lora_fuse

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "FluxTransformer2DModel"):
    pytest.skip("this diffusers has no FluxTransformer2DModel (Flux needs diffusers 0.30 or newer)",
                allow_module_level=True)

CONFIGS = Path(flux_names.__file__).resolve().parent.parent / "resources" / "configs"
TINY = {"attention_head_dim": 8, "num_attention_heads": 2, "num_layers": 2, "num_single_layers": 2,
        "in_channels": 16, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
        "axes_dims_rope": [2, 2, 4]}
SUFFIXES = {"lora": (".lora_down.weight", ".lora_up.weight", ".alpha"), "dora": (".diff",)}


def released(variant: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"flux-{variant}" / "transformer" / "config.json").read_text())


def expected_keys(config: Any, targets: list[str], kind: str) -> dict[str, str]:
    """Each file key the writer must produce -> the original weight it patches (one key per fused layer)."""
    slots = flux_names.module_table(config)
    return {flux_names.lora_key(slots[name].original) + suffix: f"diffusion_model.{slots[name].original}.weight"
            for name in targets for suffix in SUFFIXES[kind]}


def key_maps(original_keys: list[str], config: Any) -> dict[str, dict[str, rules.Target]]:
    shape = (int(config["num_layers"]), int(config["num_single_layers"]), flux_names.inner_dim(config),
             bool(config["guidance_embeds"]))
    unet = rules.unet_key_map(original_keys, *shape)
    return {"forge": unet, "comfy": unet}


def check_every_key_lands(keys: dict[str, str], original_keys: list[str], config: Any) -> None:
    for loader, unet_map in key_maps(original_keys, config).items():
        matched = rules.forge_matches(keys, unet_map, rules.clip_key_map([], [], forge=loader == "forge"))
        assert sorted(set(keys) - set(matched)) == [], loader
        assert {key: target[0] for key, target in matched.items()} == keys, loader
        assert all(target[1] is None for target in matched.values()), loader  # whole fused layers


# --- tiny: the real file, applied -----------------------------------------------------------------------------

def trained_tiny(kind: str) -> tuple[Any, Any, list[str]]:
    """A tiny dev transformer (plain) and a copy with peft adapters whose up weights are random."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    plain = diffusers.FluxTransformer2DModel.from_config(TINY)
    targets = flux_names.lora_target_names(plain)
    adapted = diffusers.FluxTransformer2DModel.from_config(TINY)
    adapted.load_state_dict(plain.state_dict())
    config = LoraConfig(r=2, lora_alpha=3, target_modules=targets, use_dora=kind == "dora")
    inject_adapter_in_model(config, adapted, adapter_name="default")
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(0.1 * torch.randn_like(param))
    return plain, adapted, targets


def written(adapted: Any, targets: list[str]) -> dict[str, torch.Tensor]:
    factors = {name: lora_fuse.layer_factors(adapted.get_submodule(name), "default") for name in targets}
    return lora_fuse.host_tensors(factors, flux_names.module_table(adapted.config), flux_names.lora_key)


def merged_weights(adapted: Any) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in adapted.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return {key.replace(".base_layer", ""): value for key, value in adapted.state_dict().items()
            if "lora_" not in key}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_tiny_file_matches_forge_and_comfy_and_reproduces_the_adapters(kind: str) -> None:
    plain, adapted, targets = trained_tiny(kind)
    tensors = written(adapted, targets)
    original = flux_names.to_original(plain.state_dict(), plain.config)
    expected = expected_keys(plain.config, targets, kind)
    assert set(tensors) == set(expected)
    if kind == "lora":  # q, k, v and the MLP input on one fused layer: their ranks summed
        assert tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, 16)
    check_every_key_lands(expected, list(original), plain.config)
    weights = {f"diffusion_model.{key}": value.clone() for key, value in original.items()}
    unconsumed = rules.apply(weights, tensors, key_maps(list(original), plain.config)["forge"])
    assert unconsumed == []
    patched = flux_names.from_original({k.removeprefix("diffusion_model."): v for k, v in weights.items()},
                                       plain.config)
    merged = merged_weights(adapted)
    worst = max(float((patched[key] - merged[key]).abs().max()) for key in merged)
    assert worst < 1e-5
    changed = [key for key in merged if not torch.equal(merged[key], plain.state_dict()[key])]
    assert len(changed) == len(targets)  # the test is not vacuous: every adapter changed its weight


def test_partly_trained_fused_layer_leaves_other_rows_alone() -> None:
    plain, adapted, _ = trained_tiny("lora")
    only_q = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_v"]
    tensors = written(adapted, only_q)
    qkv = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert qkv.shape == (48, 2) and torch.count_nonzero(qkv[16:]) == 0 and torch.count_nonzero(qkv[:16]) > 0
    linear1 = tensors["lora_unet_single_blocks_1_linear1.lora_up.weight"]
    assert torch.count_nonzero(linear1[:32]) == 0 and torch.count_nonzero(linear1[48:]) == 0


# --- released architecture: every key, on meta tensors ---------------------------------------------------------

@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_released_layout_matches_forge_and_comfy(variant: str, kind: str) -> None:
    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel.from_config(released(variant))
    targets = flux_names.lora_target_names(model)
    original = list(flux_names.to_original(model.state_dict(), model.config))
    keys = expected_keys(model.config, targets, kind)
    assert len({key.split(".")[0] for key in keys}) == 19 * 10 + 38 * 3  # fused: qkv x2, proj x2, mlp x4, mod x2
    check_every_key_lands(keys, original, model.config)


def test_replayed_loaders_do_reject_foreign_keys() -> None:
    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel.from_config(released("schnell"))
    original = list(flux_names.to_original(model.state_dict(), model.config))
    unet_map = key_maps(original, model.config)["forge"]
    foreign = {"lora_unet_double_blocks_19_img_attn_qkv.alpha", "lora_unet_guidance_in_in_layer.alpha",
               "lora_unet_single_blocks_0_attn_to_q.alpha"}
    assert rules.matches(foreign, unet_map) == {}


# --- diffusers' own loader (SD.Next, diffusers pipelines) at the released size --------------------------------

def test_diffusers_reads_the_file_at_released_size() -> None:
    """diffusers converts kohya Flux files into per-layer LoRAs; each must change its layer exactly as ours."""
    torch.manual_seed(0)
    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel.from_config(released("dev"))
    targets = flux_names.lora_target_names(model)
    factors = {}
    for name in targets:
        layer = model.get_submodule(name)
        factors[name] = lora_fuse.Factors(torch.randn(2, layer.in_features) / 50,
                                          torch.randn(layer.out_features, 2) / 50, 0.75)
    tensors = lora_fuse.host_tensors(factors, flux_names.module_table(model.config), flux_names.lora_key)
    converted = diffusers.FluxPipeline.lora_state_dict(tensors)
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert len(converted) == 2 * len(targets)
    for name, ours in factors.items():
        down = converted[f"transformer.{name}.lora_A.weight"].float()
        up = converted[f"transformer.{name}.lora_B.weight"].float()
        probe = torch.randn(down.shape[1], 3)
        theirs = up @ (down @ probe)  # diffusers bakes alpha / rank into the factors of kohya files
        assert torch.allclose(theirs, ours.scale * (ours.up @ (ours.down @ probe)), rtol=1e-4, atol=1e-6), name
