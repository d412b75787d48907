"""Memory estimate, presets by memory class and the it/s collapse monitor."""

from __future__ import annotations

import dataclasses

import pytest

from dreambooth.config.schema import FAMILIES, TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.families import get_family
from dreambooth.guide.memory import (
    GIB,
    PARAMS,
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
    assert full.trainable_params == PARAMS["sdxl"]["unet"]
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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("memory_gb", MEMORY_CLASSES_GB)
def test_preset_fits_its_memory_class(family: str, memory_gb: int) -> None:
    preset = preset_for(family, memory_gb)
    config = apply_preset(TrainingConfig(**get_family(family).config_defaults()), preset)  # its native resolution
    need = estimate_memory(config, family).total
    if (family == "sdxl" and memory_gb < 12) or (family == "sd3" and memory_gb < 8):
        # Even an 8-bit LoRA of SDXL's 2.6B-parameter UNet (SD 3.5 Medium's 2.2B transformer at 1024 px) does not
        # fit: the notes must say so.
        assert need > memory_gb * GIB * 0.9 and "does not fit" in " ".join(preset_notes(family, memory_gb))
    else:
        assert need <= memory_gb * GIB
        assert preset_fits(family, memory_gb)


def test_presets_use_more_memory_as_it_grows() -> None:
    for family in FAMILIES:
        needs = [estimate_memory(apply_preset(TrainingConfig(model_family=family), preset_for(family, gb)),
                                 family).total for gb in MEMORY_CLASSES_GB]
        assert needs == sorted(needs), family
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
    assert counts["te"] == sum(t.numel() for t in components.text_encoders[0].state_dict().values())
    config = TrainingConfig(model_family="sd1", method="dreambooth", optimizer="adamw")
    tiny, real = estimate_memory(config, params=counts), estimate_memory(config)
    assert tiny.trainable_params == counts["unet"] + counts["te"]
    assert counts["te"] - sum(p.numel() for p in components.text_encoders[0].parameters()) <= 77
    assert tiny.total < 1.2 * GIB < 10 * GIB < real.total  # overhead dominates for a tiny model
    assert model_params(tmp_path / "missing") is None
