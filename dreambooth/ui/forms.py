"""Pure mapping between the settings schema and form controls; no gradio import here.

`control_spec` turns one schema field into a description of its control (kind, label, help, range,
choices); the tab builds gradio components from these. `config_to_values` / `values_to_config` turn a
TrainingConfig into the flat list of control values and back, in one fixed order, so every setting
round-trips through the UI unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config.schema import GROUPS, Concept, TrainingConfig, field_type, parse_value, settings, validate
from ..errors import ConfigError

# Concept panels the tab offers: four covers subject, style and two extra subjects; six leaves room.
MAX_CONCEPTS = 6
# Groups shown in the Model and Saving sections instead of the Parameters tabs.
MODEL_GROUP = "Model"
SAVING_GROUPS = ("Saving", "Samples")
# Integer settings whose range is at most this wide get a slider; wider ones a number box.
SLIDER_MAX_SPAN = 256
# Float settings that are plain fractions (0..1, default a multiple of 0.05) get a 0.01-step slider.
FRACTION_STEP = 0.01


@dataclass(frozen=True)
class ControlSpec:
    """What the tab needs to build the control of one setting."""

    name: str
    kind: str  # checkbox | number | slider | dropdown | textbox
    label: str
    help: str
    group: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    precision: int | None = None  # 0: whole numbers
    choices: tuple[str, ...] | None = None
    lines: int = 1
    read_only: bool = False


def _is_fraction(f: dataclasses.Field, default: Any) -> bool:
    meta = f.metadata
    return (meta.get("min") == 0.0 and meta.get("max") == 1.0
            and abs(default * 20 - round(default * 20)) < 1e-9)


def control_spec(cls: type, f: dataclasses.Field) -> ControlSpec:
    """The control of one schema field: bool -> checkbox, choices -> dropdown, bounded -> slider, ..."""
    meta, kind = f.metadata, field_type(cls, f.name)
    base = {"name": f.name, "label": meta["label"], "help": meta["help"], "group": meta["group"],
            "minimum": meta.get("min"), "maximum": meta.get("max")}
    default = f.default
    if kind is bool:
        return ControlSpec(kind="checkbox", **base)
    if meta.get("choices"):
        return ControlSpec(kind="dropdown", choices=tuple(meta["choices"]), **base)
    if kind is int:
        low, high = meta.get("min"), meta.get("max")
        bounded = low is not None and high is not None and high - low <= SLIDER_MAX_SPAN
        return ControlSpec(kind="slider" if bounded else "number", step=1, precision=0, **base)
    if kind is float:
        if _is_fraction(f, default):
            return ControlSpec(kind="slider", step=FRACTION_STEP, **base)
        return ControlSpec(kind="number", **base)
    lines = 4 if meta.get("multiline") else 1
    # The model name is chosen in the model dropdown; the base checkpoint is set on creation.
    read_only = f.name in ("model_name", "base_checkpoint")
    return ControlSpec(kind="textbox", lines=lines, read_only=read_only, **base)


def config_specs() -> list[ControlSpec]:
    """Controls of every TrainingConfig setting, in schema order."""
    return [control_spec(TrainingConfig, f) for f in settings(TrainingConfig)]


def concept_specs() -> list[ControlSpec]:
    """Controls of one concept panel, in schema order."""
    return [control_spec(Concept, f) for f in settings(Concept)]


def grouped_specs(specs: list[ControlSpec]) -> dict[str, list[ControlSpec]]:
    """Specs by group, groups in the schema's display order (unknown groups last)."""
    order = {name: index for index, name in enumerate(GROUPS)}
    groups: dict[str, list[ControlSpec]] = {}
    for spec in sorted(specs, key=lambda s: order.get(s.group, len(order))):
        groups.setdefault(spec.group, []).append(spec)
    return groups


def parameter_groups() -> dict[str, list[ControlSpec]]:
    """The groups shown as Parameters tabs (all but Model and the saving groups)."""
    groups = grouped_specs(config_specs())
    return {name: specs for name, specs in groups.items() if name != MODEL_GROUP and name not in SAVING_GROUPS}


def help_texts() -> dict[str, dict[str, str]]:
    """elem_id -> {label, help} for every control, for the tooltips script."""
    texts = {config_elem_id(s.name): {"label": s.label, "help": s.help} for s in config_specs()}
    for index in range(MAX_CONCEPTS):
        for spec in concept_specs():
            texts[concept_elem_id(index, spec.name)] = {"label": spec.label, "help": spec.help}
    return texts


def config_elem_id(name: str) -> str:
    return f"db_{name}"


def concept_elem_id(index: int, name: str) -> str:
    return f"db_c{index}_{name}"


# --- values <-> config -------------------------------------------------------------------------

def config_to_values(config: TrainingConfig) -> list[Any]:
    """The settings' values in config_specs() order."""
    return [getattr(config, spec.name) for spec in config_specs()]


def concept_to_values(concept: Concept) -> list[Any]:
    return [getattr(concept, spec.name) for spec in concept_specs()]


def concepts_to_values(concepts: list[Concept]) -> tuple[int, list[Any]]:
    """(panels in use, values of all MAX_CONCEPTS panels); unused panels hold the defaults."""
    if len(concepts) > MAX_CONCEPTS:
        raise ConfigError(f"Setting 'concepts': {len(concepts)} concepts, but the tab shows at most {MAX_CONCEPTS}; "
                          "train the others in a second run or edit db_config.json directly.")
    values: list[Any] = []
    for index in range(MAX_CONCEPTS):
        values += concept_to_values(concepts[index] if index < len(concepts) else Concept())
    return max(1, len(concepts)), values


def _parse_into(cls: type, specs: list[ControlSpec], values: list[Any], where: str) -> Any:
    obj = cls()
    for spec, raw in zip(specs, values, strict=True):
        if raw is None:
            raise ConfigError(f"{where}setting '{spec.label}' ({spec.name}) is empty; enter a value.")
        setattr(obj, spec.name, parse_value(cls, spec.name, raw))
    return obj


def concept_is_empty(concept: Concept) -> bool:
    """A panel nobody filled in: no folder and no prompt."""
    return not (concept.instance_data_dir.strip() or concept.instance_prompt.strip())


def panel_concepts(in_use: Any, values: list[Any]) -> list[Concept | None]:
    """The concept of each of the first `in_use` panels; None for a blank panel."""
    width = len(concept_specs())
    if len(values) != width * MAX_CONCEPTS:
        raise ValueError(f"expected {width * MAX_CONCEPTS} concept values, got {len(values)}")
    panels: list[Concept | None] = []
    for index in range(max(0, min(int(in_use or 0), MAX_CONCEPTS))):
        chunk = values[index * width:(index + 1) * width]
        concept = _parse_into(Concept, concept_specs(), chunk, f"Concept {index + 1}: ")
        panels.append(None if concept_is_empty(concept) else concept)
    return panels


def values_to_concepts(in_use: Any, values: list[Any]) -> list[Concept]:
    """The concepts of the first `in_use` panels, skipping blank ones."""
    return [concept for concept in panel_concepts(in_use, values) if concept is not None]


def values_to_config(values: list[Any], in_use: int, concept_values: list[Any]) -> TrainingConfig:
    """Build and validate a config from the control values (the inverse of the *_to_values functions)."""
    config = _parse_into(TrainingConfig, config_specs(), list(values), "")
    config.concepts = values_to_concepts(in_use, list(concept_values))
    return validate(config)


def form_values(config: TrainingConfig) -> list[Any]:
    """Everything the form shows for `config`: settings, panels in use, panel values."""
    in_use, panel_values = concepts_to_values(config.concepts)
    return config_to_values(config) + [in_use] + panel_values


def form_to_config(values: list[Any]) -> TrainingConfig:
    """The inverse of form_values."""
    count = len(config_specs())
    return values_to_config(values[:count], values[count], values[count + 1:])
