"""Every setting has help that says what it does, a typical value and when to change it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from dreambooth.config.schema import Concept, TrainingConfig, field_type

MIN_HELP_CHARS = 90
# Words that tell the user when or how to change a setting.
CHANGE_CUES = re.compile(r"\b(raise|lower|turn|use|set|change|choose|add|leave|keep|match|try|start|make|"
                         r"only|when|if)\b", re.IGNORECASE)
# A typical value: a number, or an explicit 'typical'/'default'/'e.g.'.
TYPICAL = re.compile(r"\d|\btypical\b|\be\.g\.", re.IGNORECASE)


def all_fields() -> list[tuple[str, dataclasses.Field]]:
    return [(cls.__name__, f) for cls in (TrainingConfig, Concept) for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("owner", "f"), all_fields(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_help_is_present_and_informative(owner: str, f: dataclasses.Field) -> None:
    text = f.metadata.get("help", "")
    assert len(text) >= MIN_HELP_CHARS, f"{owner}.{f.name}: help too short ({len(text)} chars)"
    assert CHANGE_CUES.search(text), f"{owner}.{f.name}: help does not say when or how to change it"
    assert TYPICAL.search(text), f"{owner}.{f.name}: help gives no typical value or example"
    assert text.rstrip().endswith((".", ")")), f"{owner}.{f.name}: help should be full sentences"


def test_numeric_settings_give_numbers() -> None:
    missing = []
    for owner, f in all_fields():
        if f.name == "concepts":
            continue
        cls = TrainingConfig if owner == "TrainingConfig" else Concept
        if field_type(cls, f.name) in (int, float) and not re.search(r"\d", f.metadata["help"]):
            missing.append(f"{owner}.{f.name}")
    assert not missing, f"numeric settings whose help names no value: {missing}"


def test_choices_are_explained() -> None:
    """A setting with choices names at least half of them in its help."""
    vague = []
    for owner, f in all_fields():
        choices = f.metadata.get("choices") or ()
        named = [choice for choice in choices if choice in f.metadata.get("help", "")]
        if choices and len(named) * 2 < len(choices):
            vague.append(f"{owner}.{f.name}")
    assert not vague, f"settings whose help does not explain their choices: {vague}"
