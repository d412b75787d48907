"""Memory of a Flux.1 LoRA run, from the released model's real shapes: what a quantized base, cached captions
(T5-XXL off the device) and checkpointing save, and presets that fit 12, 16 and 24 GB."""

from __future__ import annotations

import pytest

from dreambooth.config.schema import TrainingConfig
from dreambooth.families import get_family
from dreambooth.guide.memory import GIB, estimate_memory
from dreambooth.guide.presets import apply_preset, preset_fits, preset_for, preset_notes

pytest.importorskip("diffusers")


def lora(**changes: object) -> TrainingConfig:
    settings = {"model_family": "flux-dev", "prediction_type": "flow_matching", "method": "lora", "lora_rank": 16,
                "resolution": 1024, "gradient_checkpointing": True, "train_text_encoder": False,
                "optimizer": "adamw_8bit", **changes}
    return TrainingConfig(**settings)  # type: ignore[arg-type]


def test_parameter_counts_are_the_released_models() -> None:
    dev, schnell = get_family("flux-dev").parameter_counts(), get_family("flux-schnell").parameter_counts()
    assert 11.8e9 < dev["transformer"] < 12.0e9  # "a 12 billion parameter rectified flow transformer"
    assert 4.7e9 < dev["text_encoder_2"] < 5.0e9 and 120e6 < dev["text_encoder"] < 125e6  # T5-XXL encoder, CLIP-L
    config = get_family("flux-dev").shipped_configs()["transformer"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    guidance_embedder = 256 * width + width + width * width + width  # dev's only extra layers
    assert dev["transformer"] - schnell["transformer"] == guidance_embedder


def test_a_quantized_base_saves_what_its_storage_saves() -> None:
    full, int8, nf4 = (estimate_memory(lora(base_quantization=mode)) for mode in ("none", "int8", "nf4"))
    transformer = get_family("flux-dev").parameter_counts()["transformer"]
    assert full.weights - int8.weights == pytest.approx(transformer * (2 - 1.0013), rel=1e-3)
    assert 0.25 < (nf4.weights - full.weights + transformer * 2) / (transformer * 2) < 0.28
    assert full.total > 24 * GIB > int8.total and nf4.total < 12 * GIB


def test_t5_counts_only_while_captions_are_not_cached() -> None:
    cached, encoded_each_step = estimate_memory(lora()), estimate_memory(lora(cache_text_encoder_outputs="off"))
    text = get_family("flux-dev").parameter_counts()
    assert encoded_each_step.weights - cached.weights == (text["text_encoder"] + text["text_encoder_2"]) * 2


def test_activations_follow_the_image_area_and_checkpointing() -> None:
    small, large = estimate_memory(lora(resolution=512)), estimate_memory(lora())
    assert large.activations == pytest.approx(4 * small.activations, rel=1e-6)
    assert large.activations_other_checkpointing > 10 * large.activations


@pytest.mark.parametrize(("memory_gb", "storage"), [(12, "nf4"), (16, "nf4"), (24, "int8"), (48, None)])
def test_presets_fit_12_16_and_24_gb(memory_gb: int, storage: str | None) -> None:
    preset = preset_for("flux-dev", memory_gb)
    assert preset["method"] == "lora" and preset.get("base_quantization") == storage
    config = apply_preset(lora(), preset)
    assert estimate_memory(config).total <= memory_gb * GIB * 0.9 and preset_fits("flux-dev", memory_gb)
    notes = " ".join(preset_notes("flux-dev", memory_gb))
    assert ("bitsandbytes" in notes) == (storage is not None) and "Full-weight DreamBooth" not in notes


def test_8_gb_is_too_small_and_says_so() -> None:
    assert not preset_fits("flux-dev", 8)
    assert "does not fit 8 GB even as a LoRA on a nf4 base" in " ".join(preset_notes("flux-dev", 8))


def test_a_models_own_counts_include_split_weight_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A working folder's transformer and T5 are counted over all their files (diffusers splits large parts)."""
    from safetensors.torch import load_file, save_file

    from dreambooth.guide.memory import model_params
    from dreambooth.models.components import save_components
    from dreambooth.models.tiny import tiny_components

    components = tiny_components("flux-dev")
    working = save_components(components, tmp_path / "working")
    whole = model_params(working)
    assert whole is not None and whole["transformer"] == sum(p.numel() for p in components.denoiser.parameters())
    single = working / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(single))
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, str(single.with_name("diffusion_pytorch_model-00001-of-00002.safetensors")))
    save_file({k: tensors[k] for k in names[1::2]}, str(single.with_name("diffusion_pytorch_model-00002-of-00002.safetensors")))
    single.unlink()
    assert model_params(working) == whole
