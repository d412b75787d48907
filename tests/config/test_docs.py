"""docs/SETTINGS.md is the schema's own rendering: regenerate it when a setting changes."""

from __future__ import annotations

from pathlib import Path

from dreambooth.config.docs import settings_markdown
from dreambooth.config.schema import Concept, TrainingConfig, settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "SETTINGS.md"
REGENERATE = ("python -c \"from dreambooth.config.docs import settings_markdown as s; "
              "open('docs/SETTINGS.md', 'w').write(s())\"")


def test_settings_doc_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == settings_markdown(), f"docs/SETTINGS.md is stale; run {REGENERATE}"


def test_every_setting_is_documented() -> None:
    text = settings_markdown()
    for f in settings(TrainingConfig) + settings(Concept):
        assert f"| `{f.name}` |" in text
