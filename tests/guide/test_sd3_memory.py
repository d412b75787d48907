"""Memory of SD3 / SD 3.5 runs: activations counted from the released shapes, and T5-XXL counted exactly when the
model has it (on the device beside the transformer while captions are encoded, all the time when they are not
cached)."""

from __future__ import annotations

import pytest

from dreambooth.config.schema import TrainingConfig
from dreambooth.families import get_family
from dreambooth.guide.memory import GIB, estimate_memory, released_params

pytest.importorskip("diffusers")


def lora(**changes: object) -> TrainingConfig:
    settings = {"model_family": "sd3", "prediction_type": "flow_matching", "method": "lora", "lora_rank": 16,
                "resolution": 1024, "gradient_checkpointing": True, "train_text_encoder": False,
                "optimizer": "adamw_8bit", "mixed_precision": "bf16", **changes}
    return TrainingConfig(**settings)  # type: ignore[arg-type]


def test_activation_memory_is_counted_from_the_released_shapes() -> None:
    from dreambooth.families.sd3 import memory_facts

    unit = get_family("sd3")
    counted = memory_facts(unit.shipped_configs()["transformer"])
    assert unit.activation_gib == pytest.approx(counted["activation_bytes"] / GIB, abs=0.01)
    assert unit.checkpointing_factor == pytest.approx(counted["checkpointing_factor"], abs=1e-4)
    # The three releases in the order of their size; SD 3.5 Medium's second image attention costs more per token.
    variants = {name: memory_facts(config)["activation_bytes"] for name, config in unit.variant_configs().items()}
    assert variants["sd3-medium"] < variants["sd3.5-medium"] < variants["sd3.5-large"]


def test_activations_follow_the_image_tokens() -> None:
    from dreambooth.families.sd3 import memory_facts

    config = get_family("sd3").shipped_configs()["transformer"]
    small, large = memory_facts(config, 512)["activation_bytes"], memory_facts(config, 1024)["activation_bytes"]
    assert 3.0 < large / small < 4.0  # four times the image tokens, the same 333 text tokens


def _with_t5() -> dict[str, int]:
    return get_family("sd3").parameter_counts()


def test_t5_counts_only_when_the_model_has_it() -> None:
    t5 = _with_t5()["text_encoder_3"]
    assert 4.7e9 < t5 < 4.8e9
    assert "text_encoder_3" not in released_params(get_family("sd3"))  # most SD3 files ship without T5
    without, with_t5 = estimate_memory(lora()), estimate_memory(lora(), params=_with_t5())
    assert without.training == with_t5.training  # cached captions: T5 leaves the device before the first step
    assert with_t5.caching_peak - without.caching_peak == t5 * 2
    assert without.total < 8 * GIB < with_t5.total == with_t5.caching_peak


def test_t5_stays_on_the_device_when_captions_are_not_cached() -> None:
    t5 = _with_t5()["text_encoder_3"]
    without, with_t5 = (estimate_memory(lora(cache_text_encoder_outputs="off"), params=params)
                        for params in (None, _with_t5()))
    assert with_t5.weights - without.weights == t5 * 2 and with_t5.caching_peak == 0
    assert "caption caching" not in "".join(with_t5.lines())
    assert "caption caching" in "".join(estimate_memory(lora(), params=_with_t5()).lines())
