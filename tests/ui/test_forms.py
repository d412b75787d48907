"""The schema -> control mapping and the control values <-> config round trip."""

from __future__ import annotations

import pytest

from dreambooth.config.io import to_dict
from dreambooth.config.schema import FLOW_SETTINGS, GROUPS, Concept, TrainingConfig, settings
from dreambooth.errors import ConfigError
from dreambooth.ui import forms


def _spec(name: str) -> forms.ControlSpec:
    return next(s for s in forms.config_specs() if s.name == name)


def test_every_setting_has_a_control_with_label_and_help() -> None:
    specs = forms.config_specs()
    assert [s.name for s in specs] == [f.name for f in settings(TrainingConfig)]
    for spec in specs + forms.concept_specs():
        assert spec.label and spec.help, spec.name
        assert spec.kind in ("checkbox", "number", "slider", "dropdown", "textbox")


@pytest.mark.parametrize(("name", "kind"), [
    ("train_unet", "checkbox"), ("lr_scheduler", "dropdown"), ("learning_rate", "number"),
    ("max_train_steps", "number"), ("clip_skip", "slider"), ("caption_dropout", "slider"),
    ("adam_beta2", "number"), ("sample_prompts", "textbox"), ("extra_resolutions", "textbox"),
])
def test_control_kind_follows_type_and_range(name: str, kind: str) -> None:
    assert _spec(name).kind == kind


def test_control_carries_schema_range_choices_and_lines() -> None:
    assert _spec("lr_scheduler").choices == TrainingConfig.__dataclass_fields__["lr_scheduler"].metadata["choices"]
    clip = _spec("clip_skip")
    assert (clip.minimum, clip.maximum, clip.step, clip.precision) == (1, 12, 1, 0)
    assert _spec("sample_prompts").lines > 1
    assert _spec("model_name").read_only and not _spec("seed").read_only


def test_groups_follow_schema_order_and_split_into_sections() -> None:
    groups = forms.grouped_specs(forms.config_specs())
    assert list(groups) == [g for g in GROUPS if g in groups]
    parameters = forms.parameter_groups()
    assert "Model" not in parameters and "Saving" not in parameters and "Samples" not in parameters
    shown = {s.name for specs in parameters.values() for s in specs}
    shown |= {s.name for g in ("Model", *forms.SAVING_GROUPS) for s in groups.get(g, [])}
    assert shown == {f.name for f in settings(TrainingConfig)}


def _non_default_config() -> TrainingConfig:
    """A config where every setting differs from its default (within its bounds)."""
    config = TrainingConfig()
    for spec in forms.config_specs():
        setattr(config, spec.name, _other_value(spec, getattr(config, spec.name)))
    # Cross-field rules of the schema: resolutions are multiples of 8; the flow-matching settings and the LoRA key
    # format belong to SD3 (test_flow_fields_round_trip_through_form_values covers them).
    config.resolution, config.extra_resolutions = 768, "384,640"
    for name in (*FLOW_SETTINGS, "lora_key_format"):
        setattr(config, name, TrainingConfig.__dataclass_fields__[name].default)
    config.bucket_min_resolution, config.bucket_max_resolution, config.bucket_step = 320, 1280, 32
    config.concepts = [Concept(instance_data_dir=f"/data/c{i}", instance_prompt=f"photo of sks{i} dog",
                               num_class_images=10 * i, class_guidance_scale=5.5, repeats=i + 1,
                               sample_seed=i) for i in range(3)]
    return config


def _other_value(spec: forms.ControlSpec, value: object) -> object:
    if spec.kind == "checkbox":
        return not value
    if spec.choices:
        return next(c for c in spec.choices if c != value)
    if isinstance(value, str):
        return value + "x"
    high = spec.maximum if spec.maximum is not None else value + 10
    step = 1 if isinstance(value, int) else (high - value) / 3
    candidate = value + step if value + step <= high else value - step
    return type(value)(candidate)


def test_every_field_round_trips_through_form_values() -> None:
    config = _non_default_config()
    values = forms.form_values(config)
    assert len(values) == len(forms.config_specs()) + 1 + forms.MAX_CONCEPTS * len(forms.concept_specs())
    back = forms.form_to_config(values)
    assert to_dict(back) == to_dict(config)
    assert to_dict(TrainingConfig()) != to_dict(config)


def test_flow_fields_round_trip_through_form_values() -> None:
    config = TrainingConfig(model_family="sd3", prediction_type="flow_matching")
    specs = {spec.name: spec for spec in forms.config_specs()}
    # flow_resolution_shift is Flux dev's (SD3 refuses it); tests/families/test_flux_family.py covers it.
    for name in (*(n for n in FLOW_SETTINGS if n != "flow_resolution_shift"), "lora_key_format"):
        setattr(config, name, _other_value(specs[name], getattr(config, name)))
    back = forms.form_to_config(forms.form_values(config))
    assert to_dict(back) == to_dict(config)


def test_ui_value_types_are_parsed() -> None:
    # Gradio gives floats from sliders and numbers; whole floats become ints where the schema says int.
    values = forms.form_values(TrainingConfig())
    index = [s.name for s in forms.config_specs()].index("clip_skip")
    values[index] = 2.0
    assert forms.form_to_config(values).clip_skip == 2


def test_blank_panels_are_dropped_and_hidden_panels_ignored() -> None:
    config = TrainingConfig(concepts=[Concept(instance_data_dir="/a", instance_prompt="a")])
    in_use, panel_values = forms.concepts_to_values(config.concepts)
    assert in_use == 1
    width = len(forms.concept_specs())
    panel_values[width:2 * width] = forms.concept_to_values(Concept(instance_data_dir="/hidden"))
    assert [c.instance_data_dir for c in forms.values_to_concepts(1, panel_values)] == ["/a"]
    assert [c.instance_data_dir for c in forms.values_to_concepts(2, panel_values)] == ["/a", "/hidden"]
    assert forms.values_to_concepts(3, panel_values)[-1].instance_data_dir == "/hidden"


def test_empty_number_box_names_the_setting() -> None:
    values = forms.form_values(TrainingConfig())
    values[[s.name for s in forms.config_specs()].index("learning_rate")] = None
    with pytest.raises(ConfigError, match="learning_rate"):
        forms.form_to_config(values)


def test_out_of_range_value_is_rejected_by_the_schema() -> None:
    values = forms.form_values(TrainingConfig())
    values[[s.name for s in forms.config_specs()].index("clip_skip")] = 99
    with pytest.raises(ConfigError, match="clip_skip"):
        forms.form_to_config(values)


def test_too_many_concepts_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="at most"):
        forms.concepts_to_values([Concept(instance_data_dir=str(i)) for i in range(forms.MAX_CONCEPTS + 1)])


def test_help_texts_cover_every_control_id() -> None:
    texts = forms.help_texts()
    assert texts[forms.config_elem_id("learning_rate")]["help"].startswith("Learning rate")
    assert forms.concept_elem_id(forms.MAX_CONCEPTS - 1, "instance_prompt") in texts
    assert all(entry["help"] for entry in texts.values())
