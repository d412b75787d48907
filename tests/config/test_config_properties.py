"""Property tests (hypothesis) for config load, validate and migrate."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreambooth.config import io
from dreambooth.config.schema import (
    DDPM_ONLY_SETTINGS,
    FLOW_SETTINGS,
    MAX_EPOCHS,
    MAX_STEPS,
    Concept,
    TrainingConfig,
    field_type,
    validate,
)
from dreambooth.config.schema import settings as schema_settings
from dreambooth.errors import ConfigError
from dreambooth.families import get_family


def valid_value(f: dataclasses.Field, cls: type) -> st.SearchStrategy[Any]:
    """Values the field accepts, drawn from its own metadata."""
    meta, kind = f.metadata, field_type(cls, f.name)
    if meta.get("choices"):
        return st.sampled_from(meta["choices"])
    if kind is bool:
        return st.booleans()
    if kind is int:
        low = int(meta["min"]) if meta.get("min") is not None else -(2**31)
        high = int(meta["max"]) if meta.get("max") is not None else 2**31
        return st.integers(low, high)
    if kind is float:
        low = meta["min"] if meta.get("min") is not None else -1e9
        high = meta["max"] if meta.get("max") is not None else 1e9
        return st.floats(low, high, allow_nan=False, allow_infinity=False)
    return st.text(max_size=30)


def _resolution_safe(config: TrainingConfig) -> TrainingConfig:
    # Resolutions must also be multiples of 8 (16 for Flux): a cross-field rule the per-field metadata cannot express.
    family = get_family(config.model_family)
    config.resolution -= config.resolution % family.pixel_multiple
    if family.pixel_multiple > 8:
        config.bucket_step = max(family.pixel_multiple, config.bucket_step - config.bucket_step % family.pixel_multiple)
    config.extra_resolutions = ""
    return _family_safe(_objective_safe(config))


def _family_safe(config: TrainingConfig) -> TrainingConfig:
    # The family's own rules: the resolution shift only where the model samples with one (and then no fixed
    # shift beside it), and the methods it trains with (Flux: LoRA only).
    family = get_family(config.model_family)
    if not family.scheduler_config().get("use_dynamic_shifting", False):
        config.flow_resolution_shift = False
    if config.flow_resolution_shift:
        config.flow_shift = TrainingConfig.__dataclass_fields__["flow_shift"].default
    try:
        family.check_config(config)
    except ConfigError:
        config.method = "lora"
    return config


def _objective_safe(config: TrainingConfig) -> TrainingConfig:
    # Another cross-field rule: settings of the other objective (DDPM or flow matching) stay off.
    if get_family(config.model_family).denoiser_folder == "unet":
        config.lora_key_format = "original"
    if config.prediction_type == "flow_matching":
        for name, off in DDPM_ONLY_SETTINGS.items():
            setattr(config, name, off)
    else:
        for name in FLOW_SETTINGS:
            setattr(config, name, TrainingConfig.__dataclass_fields__[name].default)
    return config


def configs() -> st.SearchStrategy[TrainingConfig]:
    def build(cls: type) -> st.SearchStrategy[Any]:
        return st.builds(cls, **{f.name: valid_value(f, cls) for f in schema_settings(cls)})

    concepts = st.lists(build(Concept), max_size=3)
    return st.tuples(build(TrainingConfig), concepts).map(
        lambda pair: _resolution_safe(dataclasses.replace(pair[0], concepts=pair[1])))


JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
FIELD_NAMES = [f.name for f in schema_settings(TrainingConfig)]
CONCEPT_NAMES = [f.name for f in schema_settings(Concept)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_any_valid_config_round_trips_through_json(config: TrainingConfig) -> None:
    validate(config)
    text = json.dumps(io.to_dict(config))
    assert io.from_dict(json.loads(text)) == config


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*FIELD_NAMES, "version", "max_steps", "junk"]), JSON_JUNK, max_size=6),
       st.lists(st.dictionaries(st.sampled_from([*CONCEPT_NAMES, "odd"]), JSON_JUNK, max_size=4), max_size=2))
def test_junk_values_validate_or_raise_config_error(data: dict[str, Any], concepts: list[Any]) -> None:
    data = {**data, "concepts": concepts}
    try:
        config = io.from_dict(data, warn=lambda message: None)
    except ConfigError as error:
        assert str(error)
        return
    assert validate(config) is config


@settings(max_examples=100, deadline=None)
@given(JSON_JUNK)
def test_any_json_document_validates_or_raises_config_error(document: Any) -> None:
    try:
        io.from_dict(document, warn=lambda message: None)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(0, MAX_STEPS), st.integers(0, MAX_EPOCHS))
def test_migration_from_v1_keeps_steps(old_steps: int, unrelated: int) -> None:
    config = io.from_dict({"version": 1, "max_steps": old_steps, "num_train_epochs": unrelated})
    assert config.max_train_steps == old_steps and config.num_train_epochs == unrelated


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=io.SCHEMA_VERSION + 1))
def test_any_newer_version_is_refused(version: int) -> None:
    try:
        io.from_dict({"version": version})
    except ConfigError as error:
        assert "newer version" in str(error)
    else:
        raise AssertionError(f"version {version} was accepted")


OLD_KEYS = ["learning_rate", "lr_scheduler", "use_lora", "stop_text_encoder", "optimizer", "cache_latents",
            "half_model", "lora_unet_rank", "lora_txt_rank", "use_lora_extended", "max_steps", "concepts_list",
            "concepts_path", "seed", "attention", "something_else"]
OLD_CONCEPT_KEYS = ["instance_data_dir", "class_data_dir", "num_class_images_per", "num_class_images",
                    "max_steps", "file_prompt_contents", "n_save_sample", "save_sample_template", "whatever"]


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    JSON_JUNK,
    st.dictionaries(st.sampled_from(OLD_KEYS), JSON_JUNK, max_size=6),
    st.lists(st.dictionaries(st.sampled_from(OLD_CONCEPT_KEYS), JSON_JUNK, max_size=5), max_size=3)))
def test_legacy_import_of_anything_succeeds_or_raises_config_error(document: Any) -> None:
    from dreambooth.config.legacy import import_data

    try:
        result = import_data(document, "junk.json", None, TrainingConfig(model_name="keep"))
    except ConfigError as error:
        assert "junk.json" in str(error)
        return
    assert result.config.model_name == "keep"
    assert all(isinstance(message, str) for message in result.messages)
