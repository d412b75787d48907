"""Changing settings by name: the one rule the CLI, the service, the REST API and the trainer's CLI path share.

A name is a scalar setting of the schema (`learning_rate`) or a concept's setting (`concepts.N.field`). Values
are parsed by the field's type (so CLI strings and JSON values both work) and checked against the schema's
range and choices; the result is validated as a whole. An unknown name is refused with the closest known one.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from .legacy import CORRECTABLE_IDENTITY, IdentityChange
from .schema import Concept, TrainingConfig, check_value, parse_value, settings, validate

CONCEPT_PREFIX = "concepts."
# The model's folder name is its identity: renaming the folder renames the model.
NOT_SETTABLE = {"model_name": "a model is renamed by renaming its folder, not by a setting"}


def apply_overrides(config: TrainingConfig, overrides: Mapping[str, Any], *,
                    add_concepts: bool = False) -> TrainingConfig:
    """A validated copy of `config` with every `name: value` of `overrides` set.

    `add_concepts` lets `concepts.N.field` with N equal to the number of concepts add a new concept (the
    `config --set` command); otherwise the index must name an existing concept.
    """
    changed = copy.deepcopy(config)
    for name, raw in overrides.items():
        set_override(changed, name, raw, add_concepts=add_concepts)
    return validate(changed)


def set_override(config: TrainingConfig, name: str, raw: Any, *, add_concepts: bool = False) -> Any:
    """Set one setting of `config` in place (parsed and range-checked); returns the typed value set."""
    if name.startswith(CONCEPT_PREFIX):
        concept, field = _concept_target(config, name, add_concepts)
        value = parse_checked(Concept, field, raw)
        setattr(concept, field, value)
        return value
    _check_known(name, _names(TrainingConfig), name)
    if name in NOT_SETTABLE:
        raise ConfigError(f"Setting '{name}' cannot be changed: {NOT_SETTABLE[name]}.")
    value = parse_checked(TrainingConfig, name, raw)
    if name in CORRECTABLE_IDENTITY and value != getattr(config, name):
        # Which weights the model is (family, prediction, base) is corrected on purpose, never by a run's or
        # an edit's settings: a wrong value silently trains the wrong objective.
        raise IdentityChange(f"Setting '{name}' says which weights the model is ({getattr(config, name)!r}) and "
                             "is not changed with the settings; correct it with: python -m dreambooth config "
                             f"--name NAME --set-identity {name}=VALUE (REST: PUT ...?set_identity=true).")
    setattr(config, name, value)
    return value


def parse_checked(cls: type, name: str, raw: Any) -> Any:
    """`raw` converted to the type of `cls.name` and checked against its range and choices."""
    value = parse_value(cls, name, raw)
    check_value(cls, next(f for f in settings(cls) if f.name == name), value)
    return value


def _names(cls: type) -> list[str]:
    return [f.name for f in settings(cls)]


def _check_known(field: str, known: Iterable[str], name: str) -> None:
    known = list(known)
    if field in known:
        return
    if name == "concepts":
        raise ConfigError("Setting 'concepts' is changed one field at a time: concepts.N.FIELD, e.g. "
                          "concepts.0.instance_prompt.")
    close = difflib.get_close_matches(field, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "docs/SETTINGS.md lists every setting."
    where = "" if field == name else f" in '{name}'"
    raise ConfigError(f"Unknown setting '{field}'{where}; {hint}")


def _concept_target(config: TrainingConfig, name: str, add_concepts: bool) -> tuple[Concept, str]:
    """`concepts.N.field` -> (the concept, field); with `add_concepts`, N == len(concepts) adds one."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        raise ConfigError(f"Setting '{name}': concept settings are written concepts.N.FIELD, e.g. "
                          "concepts.0.instance_prompt.")
    index, field = int(parts[1]), parts[2]
    _check_known(field, _names(Concept), name)
    count = len(config.concepts)
    last = count if add_concepts else count - 1
    if index > last:
        fix = " (the last adds a concept)" if add_concepts else "; add concepts to the model's settings first"
        allowed = f"use index 0-{last}{fix}" if last >= 0 else fix.lstrip("; ")
        raise ConfigError(f"Setting '{name}': the model has {count} concept(s); {allowed}.")
    if index == count:
        config.concepts.append(Concept())
    return config.concepts[index], field
