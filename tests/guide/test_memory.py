"""Memory estimate, presets by memory class and the it/s collapse monitor."""

from __future__ import annotations

import dataclasses

import pytest

from dreambooth.config.schema import FAMILIES, TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.families import get_family
from dreambooth.guide.memory import (
    GIB,
    ItSlowdownMonitor,
    estimate_memory,
    lora_params_per_rank,
    warn_if_exceeds,
)
from dreambooth.guide.presets import (
    MEMORY_CLASSES_GB,
    apply_preset,
    memory_class,
    preset_fits,
    preset_for,
    preset_notes,
    preset_overview,
)


def total(**changes: object) -> int:
    base = TrainingConfig(model_family="sd1", method="dreambooth", optimizer="adamw", train_text_encoder=False)
    return estimate_memory(dataclasses.replace(base, **changes)).total


def test_more_batch_and_resolution_need_more_memory() -> None:
    assert total(train_batch_size=1) < total(train_batch_size=2) < total(train_batch_size=4)
    assert total(resolution=512) < total(resolution=768)


def test_checkpointing_lora_and_8bit_need_less() -> None:
    assert total(gradient_checkpointing=True) < total(gradient_checkpointing=False)
    assert total(method="lora") < total(method="dreambooth")
    assert total(optimizer="adamw_8bit") < total(optimizer="adamw")
    assert total(optimizer="lion") < total(optimizer="adamw")
    assert total(optimizer="adafactor") < total(optimizer="adamw_8bit")
    assert total(mixed_precision="bf16") < total(mixed_precision="no")
    assert total(train_text_encoder=True) > total(train_text_encoder=False)
    assert total(use_ema=True) > total(use_ema=False)


def test_parts_follow_the_architectures() -> None:
    full = estimate_memory(TrainingConfig(model_family="sdxl", method="dreambooth", train_text_encoder=False,
                                          optimizer="adamw"))
    assert full.trainable_params == get_family("sdxl").parameter_counts()["unet"]
    assert full.gradients == 4 * full.trainable_params
    assert full.optimizer == 8 * full.trainable_params
    eight = estimate_memory(dataclasses.replace(TrainingConfig(model_family="sd1", train_text_encoder=False),
                                                optimizer="adamw_8bit"))
    assert eight.optimizer == 2 * eight.trainable_params
    assert full.activations_other_checkpointing < full.activations  # checkpointing would save memory
    assert full.total == sum(full.parts().values())


def test_lora_params_scale_with_rank() -> None:
    small = estimate_memory(TrainingConfig(method="lora", lora_rank=4, train_text_encoder=False))
    large = estimate_memory(TrainingConfig(method="lora", lora_rank=64, train_text_encoder=False))
    assert large.trainable_params == 16 * small.trainable_params
    # An SD1 rank-128 LoRA of UNet and text encoder holds about 75M parameters (~151 MB in fp16).
    assert 70e6 < 128 * lora_params_per_rank("sd1", True) < 80e6
    assert lora_params_per_rank("sdxl", False) > 4 * lora_params_per_rank("sd1", False)


def test_warn_if_exceeds() -> None:
    estimate = estimate_memory(TrainingConfig(model_family="sdxl", method="dreambooth"))
    warning = warn_if_exceeds(estimate, 8 * GIB)
    assert warning and "gradient_checkpointing" in warning and "GiB" in warning
    assert warn_if_exceeds(estimate, estimate.total + 1) is None
    assert warn_if_exceeds(estimate, None) is None


# The smallest memory class each large family's preset fits at its native resolution.
SMALLEST_FIT_GB = {"sdxl": 12, "sd3": 8, "flux-dev": 12, "flux-schnell": 12}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("memory_gb", MEMORY_CLASSES_GB)
def test_preset_fits_its_memory_class(family: str, memory_gb: int) -> None:
    preset = preset_for(family, memory_gb)
    config = apply_preset(TrainingConfig(**get_family(family).config_defaults()), preset)  # its native resolution
    need = estimate_memory(config, family).total
    smallest = SMALLEST_FIT_GB.get(get_family(family).architecture)
    if smallest is not None and memory_gb < smallest:
        # Even an 8-bit LoRA of SDXL's 2.6B-parameter UNet, or a LoRA on Flux's 12B transformer stored in 4 bits,
        # does not fit: the notes must say so.
        assert need > memory_gb * GIB * 0.9 and "does not fit" in " ".join(preset_notes(family, memory_gb))
    else:
        assert need <= memory_gb * GIB
        assert preset_fits(family, memory_gb)


def test_presets_use_more_memory_as_it_grows() -> None:
    for family in FAMILIES:
        # Ordered over the cards a preset fits; below that every preset is the same last resort.
        needs = [estimate_memory(apply_preset(TrainingConfig(**get_family(family).config_defaults()), preset_for(family, gb)),
                                 family).total for gb in MEMORY_CLASSES_GB if preset_fits(family, gb)]
        # Precision choices differ between neighbouring cards (fp16 keeps the VAE in fp32), so neighbours may swap
        # by a few percent; across the range a bigger card's preset uses more.
        assert needs[-1] > 2 * needs[0], family
    assert preset_for("sd1", 6)["method"] == "lora"
    assert preset_for("sd1", 48)["method"] == "dreambooth"


def test_cpu_preset_and_memory_classes() -> None:
    cpu = preset_for("sd1", None)
    assert cpu["mixed_precision"] == "bf16" and cpu["attention"] == "sdpa"
    assert memory_class(None) is None
    assert memory_class(10) == 8 and memory_class(80) == 48 and memory_class(4) == 6 and memory_class(7.8) == 8
    with pytest.raises(ConfigError):
        preset_for("sd9", 8)


def test_apply_preset_keeps_text_encoder_cache_valid() -> None:
    for family in FAMILIES:
        for memory_gb in (None, *MEMORY_CLASSES_GB):
            preset = preset_for(family, memory_gb)
            assert preset["cache_text_encoder_outputs"] != "on" or not preset["train_text_encoder"]
    cached = {"cache_text_encoder_outputs": "on", "train_text_encoder": False, "optimizer": "lion"}
    plain = apply_preset(TrainingConfig(), cached)
    assert plain.cache_text_encoder_outputs == "on" and plain.optimizer == "lion"
    shuffled = apply_preset(TrainingConfig(shuffle_tags=True), cached)
    assert shuffled.cache_text_encoder_outputs == "auto" and shuffled.optimizer == "lion"
    with pytest.raises(ConfigError):
        apply_preset(TrainingConfig(), {"no_such_field": 1})


def test_slowdown_monitor_warns_once_on_sustained_collapse() -> None:
    monitor = ItSlowdownMonitor(warmup_steps=10, ratio=0.4, sustain=5)
    warnings = [monitor.feed(2.0) for _ in range(30)]
    warnings += [monitor.feed(0.3)]  # one slow step (a save) is no collapse
    warnings += [monitor.feed(2.0) for _ in range(5)]
    assert not any(warnings)
    collapsed = [monitor.feed(0.5) for _ in range(20)]
    assert sum(1 for w in collapsed if w) == 1
    assert "shared" in next(w for w in collapsed if w)


def test_slowdown_monitor_quiet_for_gradual_change_and_warmup() -> None:
    monitor = ItSlowdownMonitor(warmup_steps=10)
    # The first steps are slow (compilation, caching): no baseline yet.
    assert not any(monitor.feed(0.1 if step < 5 else 2.0) for step in range(10))
    assert not any(monitor.feed(2.0 - step * 0.01) for step in range(50))


def test_the_estimate_uses_the_parameter_counts_of_the_model_really_trained(tmp_path) -> None:
    """The 14 MB demo model needs far less than a real SD1 model: the estimate reads working/'s weights."""
    pytest.importorskip("diffusers")
    from dreambooth.guide.memory import model_params
    from dreambooth.models.components import save_components
    from dreambooth.models.tiny import tiny_components

    components = tiny_components("sd1")
    save_components(components, tmp_path / "working")
    counts = model_params(tmp_path / "working")
    assert counts["unet"] == sum(p.numel() for p in components.denoiser.parameters())
    # The file's count: parameters plus saved buffers (transformers 4.30 saves the 77 position ids).
    assert counts["text_encoder"] == sum(t.numel() for t in components.text_encoders[0].state_dict().values())
    config = TrainingConfig(model_family="sd1", method="dreambooth", optimizer="adamw")
    tiny, real = estimate_memory(config, params=counts), estimate_memory(config)
    assert tiny.trainable_params == counts["unet"] + counts["text_encoder"]
    assert counts["text_encoder"] - sum(p.numel() for p in components.text_encoders[0].parameters()) <= 77
    assert tiny.total < 1.2 * GIB < 10 * GIB < real.total  # overhead dominates for a tiny model
    assert model_params(tmp_path / "missing") is None


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_are_the_shipped_configs_built_on_meta_tensors(family: str, monkeypatch) -> None:
    """The counts come from building each component (no memory): with the tiny configs in place of the
    shipped ones they equal a real tiny model's parameters, component by component."""
    pytest.importorskip("diffusers")
    from dreambooth.families import sizes
    from dreambooth.models.tiny import tiny_components, tiny_configs

    unit = get_family(family)
    real = unit.parameter_counts()
    assert set(real) == set(unit.component_folders()) and real[unit.denoiser_folder] > 5e8
    monkeypatch.setattr(type(unit), "shipped_configs", lambda self: tiny_configs(self.name))
    monkeypatch.setattr(sizes, "_COUNTS", {})
    tiny = unit.parameter_counts()
    components = tiny_components(family)
    models = [components.denoiser, components.vae, *components.text_encoders]
    assert list(tiny.values()) == [sum(p.numel() for p in model.parameters()) for model in models]
    # LoRA widths: every adapted layer's in + out, the layers the trainer adapts.
    from dreambooth.train import lora

    unet_modules = dict(components.denoiser.named_modules())
    targets = unit.lora_target_names(unit.denoiser_folder, components.denoiser)
    width = sum(sizes.adapted_width(unet_modules[name]) for name in targets)
    assert targets and set(targets) <= set(lora.unet_target_names(components.denoiser, False)) | set(unet_modules)
    assert unit.lora_parameters_per_rank()[unit.denoiser_folder] == width


def test_sd15_unet_count_matches_the_published_size() -> None:
    # diffusers' stable-diffusion-v1-5 UNet holds 859,520,964 parameters (sum of numel over its weights).
    assert get_family("sd1").parameter_counts()["unet"] == 859_520_964


def test_the_estimate_says_which_cards_hold_the_run_and_the_presets_what_fits() -> None:
    small = estimate_memory(TrainingConfig(model_family="sd1", method="lora", gradient_checkpointing=True))
    assert small.fitting_classes() == [size for size in MEMORY_CLASSES_GB if 0.9 * size * GIB >= small.total]
    assert f"fits             {small.fitting_classes()[0]} GB and larger" in small.lines()
    huge = estimate_memory(TrainingConfig(model_family="sdxl", method="dreambooth", resolution=2048,
                                          train_batch_size=8))
    assert huge.fitting_classes() == [] and "none up to 48 GB" in huge.lines()[-1]
    for family in FAMILIES:
        overview = preset_overview(family)
        assert [row.split(":")[0] for row in overview] == ["8 GB", "12 GB", "16 GB", "24 GB"]
    assert preset_overview("sdxl")[0] == "8 GB: does not fit"
    assert "LoRA" in preset_overview("sdxl")[1] and "full DreamBooth" in preset_overview("sd1")[-1]
    assert any(note.startswith("What fits: 8 GB") for note in preset_notes("sdxlv", 16))


def test_cached_text_encoders_leave_the_device_in_the_estimate() -> None:
    """With cached outputs the trainer moves the text encoders to the CPU; without, they stay. Caching
    latents saves the VAE's activations only (it stays on the device)."""
    base = TrainingConfig(model_family="sdxl", method="lora", train_text_encoder=False)
    cached = estimate_memory(dataclasses.replace(base, cache_text_encoder_outputs="on"))
    uncached = estimate_memory(dataclasses.replace(base, cache_text_encoder_outputs="off"))
    counts = get_family("sdxl").parameter_counts()
    assert uncached.weights - cached.weights == 2 * (counts["text_encoder"] + counts["text_encoder_2"])
    shuffled = estimate_memory(dataclasses.replace(base, cache_text_encoder_outputs="auto", shuffle_tags=True))
    assert shuffled.weights == uncached.weights  # 'auto' cannot cache changing captions
    no_latents = estimate_memory(dataclasses.replace(base, cache_latents="off"))
    assert no_latents.activations > cached.activations and no_latents.weights == cached.weights
