"""The settings reference (docs/SETTINGS.md), generated from the schema so it cannot drift."""

from __future__ import annotations

import dataclasses

from .schema import GROUPS, Concept, TrainingConfig, settings


def _allowed(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta.get("choices"):
        return " / ".join(f"`{c}`" for c in meta["choices"])
    low, high = meta.get("min"), meta.get("max")
    if meta.get("max_length"):
        return f"text, up to {meta['max_length']:,} characters"
    if low is None and high is None:
        return ""
    return f"{'' if low is None else low} … {'' if high is None else high}"


def _row(f: dataclasses.Field) -> str:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else ""
    note = f" *(not a training setting: {meta['ui_only']})*" if meta.get("ui_only") else ""
    text = meta["help"].replace("|", "\\|").replace("\n", " ")
    return f"| `{f.name}` | {meta['label']} | `{default!r}` | {_allowed(f)} | {text}{note} |"


def _table(fields: list[dataclasses.Field]) -> list[str]:
    return ["| key | label | default | allowed | what it does |", "|---|---|---|---|---|",
            *(_row(f) for f in fields)]


def settings_markdown() -> str:
    lines = ["# Settings reference", "",
             "Generated from `dreambooth/config/schema.py` (tests/config/test_docs.py fails when it is stale); the same fields",
             "make the tab's controls, the JSON config (`db_config.json`) and the CLI flags (`--learning-rate` …).", ""]
    by_group: dict[str, list[dataclasses.Field]] = {}
    for f in settings(TrainingConfig):
        by_group.setdefault(f.metadata["group"], []).append(f)
    for group in GROUPS:
        if group in by_group:
            lines += [f"## {group}", "", *_table(by_group[group]), ""]
    lines += ["## Concepts (one entry per concept in `concepts`)", "", *_table(settings(Concept)), ""]
    return "\n".join(lines)
