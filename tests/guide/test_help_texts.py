"""Every setting has help that says what it does, a typical value and when to change it."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

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


# --- sources are named by title and link ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
STUDY_LINK = "https://github.com/d8ahazard/sd_dreambooth_extension/discussions/547"
# "The study" says nothing to a user; a path outside the repository leads nowhere.
UNNAMED_SOURCES = re.compile(r"\bthe study\b|\bshared/|\bseeds/\d", re.IGNORECASE)


def user_facing_strings() -> list[tuple[str, str]]:
    """(where, text) of every help text and every string literal in the package (notes, flags' help, tab text)."""
    found = [(f"{owner}.{f.name}", f.metadata.get("help", "")) for owner, f in all_fields()]
    for path in sorted((ROOT / "dreambooth").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.value))
    return found


def test_help_texts_name_their_sources() -> None:
    unnamed = [where for where, text in user_facing_strings() if UNNAMED_SOURCES.search(text)]
    assert unnamed == [], f"say which source (title and link), not 'the study' or a local path: {unnamed}"
    cited = {f"{owner}.{f.name}": f.metadata["help"] for owner, f in all_fields() if "study" in f.metadata.get("help", "")}
    assert cited, "the parameter study is cited in help texts"
    unlinked = [name for name, text in cited.items() if STUDY_LINK not in text]
    assert unlinked == [], f"help texts citing the study without its link: {unlinked}"


def test_wizard_notes_name_the_study_with_its_link() -> None:
    from dreambooth.guide.wizard import WizardInput, plan

    notes = plan(WizardInput(images=[10, 4], batch=8, accumulation=2)).notes
    cited = [note for note in notes if "study" in note]
    assert cited and all(STUDY_LINK in note for note in cited)


def test_no_comment_gives_a_request_as_its_reason() -> None:
    phrase = "the issue " + "asks"
    offenders = [str(path.relative_to(ROOT)) for folder in ("dreambooth", "tests", "scripts", "tools")
                 for path in sorted((ROOT / folder).rglob("*.py"))
                 if phrase in path.read_text(encoding="utf-8").lower()]
    assert offenders == [], f"say why, not who asked: {offenders}"
