"""The one override applier: field lookup, type parsing, schema ranges and choices, `concepts.N.field`."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from dreambooth.config.overrides import apply_overrides, parse_checked, set_override
from dreambooth.config.schema import Concept, TrainingConfig, settings
from dreambooth.errors import ConfigError


def with_concepts(count: int) -> TrainingConfig:
    return TrainingConfig(concepts=[Concept(instance_prompt=f"photo of sks{index}") for index in range(count)])


def test_strings_are_parsed_by_the_fields_type_and_the_original_is_untouched() -> None:
    config = with_concepts(1)
    before = copy.deepcopy(config)
    changed = apply_overrides(config, {"train_batch_size": "4", "hflip": "true", "learning_rate": "3e-6",
                                       "concepts.0.num_class_images": "7"})
    assert (changed.train_batch_size, changed.hflip, changed.learning_rate) == (4, True, pytest.approx(3e-6))
    assert changed.concepts[0].num_class_images == 7
    assert config == before


def test_typed_values_pass_unchanged() -> None:
    changed = apply_overrides(TrainingConfig(), {"max_train_steps": 40, "use_ema": False, "optimizer": "adamw"})
    assert (changed.max_train_steps, changed.use_ema, changed.optimizer) == (40, False, "adamw")


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"learnin_rate": "1e-6"}, "Unknown setting 'learnin_rate'; did you mean learning_rate?"),
    ({"zzzzzz": 1}, "Unknown setting 'zzzzzz'; docs/SETTINGS.md lists every setting."),
    ({"concepts.0.instance_promt": "x"}, "Unknown setting 'instance_promt' in 'concepts.0.instance_promt'; "
                                         "did you mean instance_prompt"),
    ({"concepts": []}, "concepts.N.FIELD"),
    ({"concepts.first.instance_prompt": "x"}, "concepts.N.FIELD"),
    ({"concepts.1.instance_prompt": "x"}, "has 1 concept(s); use index 0-0"),
    ({"learning_rate": "fast"}, "'learning_rate': 'fast' is not a valid float"),
    ({"learning_rate": 2.0}, "above the maximum"),
    ({"optimizer": "sgd"}, "'sgd' is not allowed; choose one of"),
    ({"learning_rate": float("nan")}, "not a finite number"),
    ({"model_name": "other"}, "Setting 'model_name' cannot be changed"),
])
def test_bad_overrides_are_one_clear_error(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(with_concepts(1), overrides)
    assert fragment in str(caught.value)


def test_every_bounded_setting_is_range_checked_by_the_schema() -> None:
    """Each min/max/choices in the schema's metadata is enforced for a value just outside it."""
    for field in settings(TrainingConfig):
        meta = field.metadata
        for bad in _outside(meta):
            with pytest.raises(ConfigError, match=field.name):
                apply_overrides(TrainingConfig(), {field.name: bad})


def _outside(meta: Any) -> list[Any]:
    values: list[Any] = []
    if meta.get("choices"):
        values.append("no-such-choice")
    if meta.get("min") is not None:
        values.append(meta["min"] - 1)
    if meta.get("max") is not None:
        values.append(meta["max"] + 1)
    return values


def test_concept_index_must_exist_unless_adding() -> None:
    config = with_concepts(1)
    with pytest.raises(ConfigError, match="use index 0-0"):
        apply_overrides(config, {"concepts.1.instance_prompt": "x"})
    added = apply_overrides(config, {"concepts.1.instance_prompt": "photo of ohwx cat"}, add_concepts=True)
    assert [c.instance_prompt for c in added.concepts] == ["photo of sks0", "photo of ohwx cat"]
    with pytest.raises(ConfigError, match=r"use index 0-1 \(the last adds a concept\)"):
        apply_overrides(config, {"concepts.2.instance_prompt": "x"}, add_concepts=True)


def test_a_model_without_concepts_says_how_to_add_one() -> None:
    with pytest.raises(ConfigError, match="has 0 concept"):
        apply_overrides(TrainingConfig(), {"concepts.0.instance_prompt": "x"})


def test_the_result_is_validated_as_a_whole() -> None:
    with pytest.raises(ConfigError, match="extra_resolutions"):
        apply_overrides(TrainingConfig(), {"extra_resolutions": "384,abc"})


def test_set_override_returns_the_typed_value() -> None:
    config = with_concepts(1)
    assert set_override(config, "concepts.0.num_class_images", "12") == 12
    assert set_override(config, "hflip", "off") is False
    assert config.concepts[0].num_class_images == 12 and config.hflip is False


def test_parse_checked_names_the_field() -> None:
    assert parse_checked(Concept, "num_class_images", "3") == 3
    with pytest.raises(ConfigError, match="num_class_images"):
        parse_checked(Concept, "num_class_images", "-1")


def test_every_scalar_setting_can_be_set_to_its_default_by_name() -> None:
    defaults = {f.name: f.default for f in settings(TrainingConfig) if f.name != "model_name"}
    changed = apply_overrides(TrainingConfig(), {name: str(value) for name, value in defaults.items()})
    assert dataclasses.asdict(changed) == dataclasses.asdict(TrainingConfig())
