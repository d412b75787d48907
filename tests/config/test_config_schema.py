"""The settings schema: metadata completeness, value parsing and validation messages."""

from __future__ import annotations

import dataclasses

import pytest

from dreambooth.config.schema import (
    GROUPS,
    Concept,
    TrainingConfig,
    parse_value,
    settings,
    training_resolutions,
    validate,
)
from dreambooth.errors import ConfigError


@pytest.mark.parametrize("cls", [TrainingConfig, Concept])
def test_every_setting_has_label_help_and_group(cls: type) -> None:
    for f in settings(cls):
        assert f.metadata["label"], f.name
        assert len(f.metadata["help"]) > 10, f.name
        assert f.metadata["group"] in (*GROUPS, "Concept"), f.name


@pytest.mark.parametrize("cls", [TrainingConfig, Concept])
def test_defaults_are_valid(cls: type) -> None:
    config = TrainingConfig(concepts=[Concept()]) if cls is TrainingConfig else TrainingConfig(concepts=[cls()])
    assert validate(config) is config


def test_choice_error_names_field_value_and_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        validate(TrainingConfig(lr_scheduler="sawtooth"))
    message = str(caught.value)
    assert "lr_scheduler" in message and "sawtooth" in message and "cosine_with_restarts" in message


@pytest.mark.parametrize(("name", "value", "bound"), [
    ("learning_rate", 2.0, "maximum 1.0"),
    ("train_batch_size", 0, "minimum 1"),
    ("stop_text_encoder", -0.5, "minimum 0.0"),
])
def test_range_error_names_field_value_and_bound(name: str, value: float, bound: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(TrainingConfig(**{name: value}))
    message = str(caught.value)
    assert name in message and repr(value) in message and bound in message


@pytest.mark.parametrize(("name", "value", "kind"), [
    ("train_batch_size", "two", "int"),
    ("train_batch_size", 1.5, "int"),
    ("learning_rate", "fast", "float"),
    ("learning_rate", True, "float"),
    ("use_ema", "maybe", "bool"),
    ("sample_prompts", ["a", "b"], "str"),
])
def test_type_error_names_field_value_and_type(name: str, value: object, kind: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(TrainingConfig(**{name: value}))
    message = str(caught.value)
    assert name in message and repr(value) in message and kind in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan"])
def test_non_finite_numbers_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="max_grad_norm"):
        validate(TrainingConfig(max_grad_norm=value))  # type: ignore[arg-type]


def test_concept_error_names_the_concept() -> None:
    config = TrainingConfig(concepts=[Concept(), Concept(class_infer_steps=0)])
    with pytest.raises(ConfigError, match=r"Concept 2: Setting 'class_infer_steps'"):
        validate(config)


@pytest.mark.parametrize(("raw", "expected"), [
    ("true", True), ("Yes", True), ("1", True), ("off", False), ("0", False), (False, False),
])
def test_bool_parsing_accepts_cli_spellings(raw: object, expected: bool) -> None:
    assert parse_value(TrainingConfig, "use_ema", raw) is expected


def test_numbers_parse_from_cli_strings() -> None:
    assert parse_value(TrainingConfig, "learning_rate", "1e-6") == pytest.approx(1e-6)
    assert parse_value(TrainingConfig, "max_train_steps", "400") == 400
    assert parse_value(TrainingConfig, "max_train_steps", 400.0) == 400


def test_validate_normalises_types() -> None:
    config = validate(TrainingConfig(max_train_steps="12", learning_rate=1))  # type: ignore[arg-type]
    assert config.max_train_steps == 12 and isinstance(config.learning_rate, float)


def test_training_resolutions_parse_and_dedupe() -> None:
    assert training_resolutions(TrainingConfig(resolution=512, extra_resolutions="384; 512,768")) == [512, 384, 768]


@pytest.mark.parametrize(("extra", "fragment"), [("384,abc", "abc"), ("500", "multiple of 8"), ("²", "²"),
                                                 ("8", "outside")])
def test_bad_extra_resolutions_are_named(extra: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="extra_resolutions") as caught:
        validate(TrainingConfig(extra_resolutions=extra))
    assert fragment in str(caught.value)


def test_list_defaults_are_not_shared() -> None:
    first, second = TrainingConfig(), TrainingConfig()
    first.concepts.append(Concept())
    assert second.concepts == []
    assert dataclasses.fields(TrainingConfig)[-1].name == "concepts"
