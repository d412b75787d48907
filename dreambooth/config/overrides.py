"""Changing settings of a config by name: `field` or `concepts.N.field`, from strings or typed values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .schema import Concept, TrainingConfig, parse_value, validate


def apply_overrides(config: TrainingConfig, overrides: Mapping[str, Any]) -> TrainingConfig:
    """Set `field` or `concepts.N.field` values (strings from the CLI or typed values), then validate."""
    for name, raw in overrides.items():
        if name.startswith("concepts."):
            _, index, field_name = name.split(".", 2)
            setattr(config.concepts[int(index)], field_name, parse_value(Concept, field_name, raw))
        else:
            setattr(config, name, parse_value(TrainingConfig, name, raw))
    return validate(config)
