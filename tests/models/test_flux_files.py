"""Flux.1 files as Forge and ComfyUI users keep them: the original-layout name table (checked row by row against
diffusers' own single-file converter at the released width), bf16 / fp8 / scaled-fp8 / NF4 transformer files,
all-in-one files, and the text encoders and VAE found in the host's folders."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from dreambooth.errors import ModelError
from dreambooth.families import flux_names
from dreambooth.models import flux_files

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "FluxTransformer2DModel"):
    pytest.skip("this diffusers has no FluxTransformer2DModel (Flux needs diffusers 0.30 or newer)",
                allow_module_level=True)

CONFIGS = Path(flux_names.__file__).resolve().parent.parent / "resources" / "configs"
TINY = {"attention_head_dim": 8, "num_attention_heads": 2, "num_layers": 2, "num_single_layers": 2,
        "in_channels": 16, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
        "axes_dims_rope": [2, 2, 4]}


def released(variant: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"flux-{variant}" / "transformer" / "config.json").read_text())


def tiny_transformer(guidance: bool = True, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel.from_config({**TINY, "guidance_embeds": guidance})


def original_state(model: Any) -> dict[str, torch.Tensor]:
    return flux_names.to_original(model.state_dict(), model.config)


# --- the name table -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [True, False])
def test_table_places_every_weight_and_round_trips_exactly(guidance: bool) -> None:
    model = tiny_transformer(guidance)
    state = model.state_dict()
    assert set(flux_names.key_table(model.config)) == set(state)
    original = original_state(model)
    assert ("guidance_in.in_layer.weight" in original) == guidance
    assert original["single_blocks.1.linear1.weight"].shape == (16 * 3 + 64, 16)  # q, k, v and the MLP input fused
    back = flux_names.from_original(original, model.config)
    assert all(torch.equal(back[key], state[key]) for key in state)


def _row_ids(table: dict[str, flux_names.Slot], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One column per original weight whose entries name the weight and the row (exact in float64)."""
    rows: dict[str, int] = {}
    for key, slot in table.items():
        rows[slot.original] = rows.get(slot.original, 0) + (slot.rows or state[key].shape[0])
    return {name: (torch.arange(count, dtype=torch.float64) + index * 1e6).reshape(count, 1)
            for index, (name, count) in enumerate(sorted(rows.items()))}


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_table_matches_diffusers_converter_row_for_row_at_released_size(variant: str) -> None:
    """Every original weight is split along its rows only, so one column of row ids per weight shows where
    each of diffusers' weights comes from - at the released size, without the 12 billion weights."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel.from_config(released(variant))
    table = flux_names.key_table(model.config)
    ids = _row_ids(table, model.state_dict())
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(ids))
    ours = flux_names.from_original(ids, model.config)
    assert set(theirs) == set(ours) == set(model.state_dict())
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_released_config_is_read_back_from_the_weights(variant: str) -> None:
    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel.from_config(released(variant))
    state = model.state_dict()
    expected = {key: value for key, value in released(variant).items() if not key.startswith("_")}
    for layout, weights in (("diffusers", state), ("original", flux_names.to_original(state, model.config))):
        found = flux_names.config_from_weights(weights, {}, layout)
        assert found == {key: expected[key] for key in found}


# --- reading files ------------------------------------------------------------------------------------------

def read_transformer(path: Path, config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    tensors = flux_files.full_precision(load_file(str(path)), str(path))
    parts = flux_files.split_roles(tensors, str(path))
    return flux_files.transformer_weights(parts["transformer"], config or TINY)[1]


def test_bf16_file_with_and_without_model_prefix(tmp_path: Path) -> None:
    model = tiny_transformer()
    original = {key: value.to(torch.bfloat16) for key, value in original_state(model).items()}
    save_file(original, str(tmp_path / "bare.safetensors"))
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, str(tmp_path / "prefixed.safetensors"))
    for name in ("bare", "prefixed"):
        read = read_transformer(tmp_path / f"{name}.safetensors")
        assert all(torch.equal(read[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_fp8_and_scaled_fp8_files_are_upcast(tmp_path: Path) -> None:
    model = tiny_transformer()
    original = original_state(model)
    fp8 = {key: value.to(torch.float8_e4m3fn) if value.dim() == 2 else value for key, value in original.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    scale = torch.tensor(0.5)
    scaled = {**{k: (v / scale).to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in original.items()},
              **{k.removesuffix("weight") + "scale_weight": scale.clone() for k, v in original.items() if v.dim() == 2},
              "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    save_file(scaled, str(tmp_path / "scaled.safetensors"))
    plain = read_transformer(tmp_path / "fp8.safetensors")
    expected = flux_names.from_original({k: v.to(torch.bfloat16) if v.dtype == torch.float8_e4m3fn else v
                                         for k, v in fp8.items()}, TINY)
    assert all(torch.equal(plain[k], expected[k]) for k in expected)
    assert plain["transformer_blocks.0.attn.to_q.weight"].dtype == torch.bfloat16
    rescaled = read_transformer(tmp_path / "scaled.safetensors")
    weight = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(rescaled[weight], (scaled["double_blocks.0.img_attn.qkv.weight"].to(torch.bfloat16)
                                          * scale.to(torch.bfloat16))[:16])


def forge_nf4_file(model: Any, path: Path, double_quant: bool) -> dict[str, torch.Tensor]:
    """What Forge saves for a transformer loaded in NF4: each linear weight packed by bitsandbytes, its
    quantization state beside it (QuantState.as_dict(packed=True) under '<weight>.'), the rest in bf16."""
    functional = pytest.importorskip("bitsandbytes.functional")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in original_state(model).items():
        value = value.to(torch.bfloat16)
        if value.dim() != 2:
            tensors[f"model.diffusion_model.{key}"] = value
            continue
        packed, state = functional.quantize_4bit(value, blocksize=64, compress_statistics=double_quant,
                                                 quant_type="nf4")
        tensors[f"model.diffusion_model.{key}"] = packed
        tensors.update({f"model.diffusion_model.{key}.{name}": part
                        for name, part in state.as_dict(packed=True).items()})
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("double_quant", [False, True])
def test_forge_nf4_file_is_unpacked_by_bitsandbytes(tmp_path: Path, double_quant: bool) -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    model = tiny_transformer()
    tensors = forge_nf4_file(model, tmp_path / "nf4.safetensors", double_quant)
    assert flux_files.quantized_weights(tensors)
    read = read_transformer(tmp_path / "nf4.safetensors")
    key = "model.diffusion_model.single_blocks.0.linear1.weight"
    state = functional.QuantState.from_dict({name: tensors[f"{key}.{name}"] for name in
                                             [k[len(key) + 1:] for k in tensors if k.startswith(key + ".")]},
                                            device=torch.device("cpu"))
    unpacked = functional.dequantize_4bit(tensors[key], state)
    assert torch.equal(read["single_transformer_blocks.0.proj_mlp.weight"], unpacked[48:])
    error = (read["single_transformer_blocks.0.proj_mlp.weight"].float()
             - model.state_dict()["single_transformer_blocks.0.proj_mlp.weight"]).abs().max()
    assert 0 < float(error) < 0.05  # 4-bit rounding, not a misplaced row


def test_nf4_without_bitsandbytes_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes.functional")
    forge_nf4_file(tiny_transformer(), tmp_path / "nf4.safetensors", double_quant=False)
    real_import = builtins.__import__

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(ModelError, match=r"nf4\.safetensors stores weights in 4 bits .*pip install bitsandbytes"):
        read_transformer(tmp_path / "nf4.safetensors")


# --- parts and companion files -------------------------------------------------------------------------------

MARKER_FILES = {"clip_l": {"text_model.encoder.layers.0.layer_norm1.bias": torch.zeros(4)},
                "t5xxl": {"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(2, 2)},
                "vae": {"decoder.conv_in.weight": torch.zeros(2, 2, 3, 3)}}


def test_all_in_one_file_splits_into_its_parts(tmp_path: Path) -> None:
    model = tiny_transformer()
    tensors = {f"model.diffusion_model.{k}": v for k, v in original_state(model).items()}
    for role, prefix in (("clip_l", "text_encoders.clip_l.transformer."), ("t5xxl", "text_encoders.t5xxl.transformer."),
                         ("vae", "vae.")):
        tensors.update({prefix + key: value for key, value in MARKER_FILES[role].items()})
    save_file(tensors, str(tmp_path / "aio.safetensors"))
    parts = flux_files.split_roles(load_file(str(tmp_path / "aio.safetensors")), "aio")
    assert set(parts) == set(flux_files.ROLES)
    assert set(parts["t5xxl"]) == set(MARKER_FILES["t5xxl"])
    assert flux_files.find_flux_files(tmp_path / "aio.safetensors").parts == dict.fromkeys(flux_files.ROLES,
                                                                                         tmp_path / "aio.safetensors")


def test_companions_found_in_the_host_folders(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for folder in ("Stable-diffusion", "text_encoder", "VAE"):
        (models / folder).mkdir(parents=True)
    source = models / "Stable-diffusion" / "flux1-dev.safetensors"
    save_file(original_state(tiny_transformer()), str(source))
    with pytest.raises(ModelError, match=r"without its Flux VAE \(ae\), CLIP-L text encoder, T5-XXL text encoder"):
        flux_files.find_flux_files(source, models)
    save_file(MARKER_FILES["clip_l"], str(models / "text_encoder" / "clip_l.safetensors"))
    save_file(MARKER_FILES["t5xxl"], str(models / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors"))
    save_file(MARKER_FILES["t5xxl"], str(models / "text_encoder" / "t5xxl_fp16.safetensors"))
    save_file({"not": torch.zeros(1)}, str(models / "VAE" / "other.safetensors"))
    with pytest.raises(ModelError, match=r"without its Flux VAE \(ae\); .*VAE"):
        flux_files.find_flux_files(source, models)
    save_file(MARKER_FILES["vae"], str(models / "VAE" / "ae.safetensors"))
    found = flux_files.find_flux_files(source, models)
    assert found.parts == {"transformer": source, "clip_l": models / "text_encoder" / "clip_l.safetensors",
                           "t5xxl": models / "text_encoder" / "t5xxl_fp16.safetensors",
                           "vae": models / "VAE" / "ae.safetensors"}
    chosen = flux_files.find_flux_files(source, models, {"t5xxl": models / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors"})
    assert chosen.parts["t5xxl"].name == "t5xxl_fp8_e4m3fn.safetensors"
    assert flux_files.file_roles(source) == {"transformer"}
    sd_unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "first_stage_model.x": torch.zeros(1)}
    save_file(sd_unet, str(models / "Stable-diffusion" / "sd.safetensors"))
    assert "transformer" not in flux_files.file_roles(models / "Stable-diffusion" / "sd.safetensors")
    assert flux_files.file_roles(models / "VAE" / "other.safetensors") == set()
