"""Versioned JSON for training configs: load, migrate, validate, save atomically."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import ConfigError
from ..textfiles import read_text
from .schema import MAX_CONCEPTS, SCHEMA_VERSION, Concept, TrainingConfig, settings, validate

log = logging.getLogger(__name__)


def _migrate_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    # Version 1 called the step limit 'max_steps' (as the incumbent extension's older files do).
    if "max_steps" in data and "max_train_steps" not in data:
        data["max_train_steps"] = data.pop("max_steps")
    return data


def _migrate_2_to_3(data: dict[str, Any]) -> dict[str, Any]:
    # 'cache_text_encoder_outputs' became auto/on/off. false was the default and meant "encode every step";
    # auto caches only where that gives the same result, so it keeps what was learnt and is faster.
    value = data.get("cache_text_encoder_outputs")
    if isinstance(value, bool):
        data["cache_text_encoder_outputs"] = "on" if value else "auto"
    return data


# One small function per schema change: MIGRATIONS[v] turns a version-v dict into version v+1.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}


def migrate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    version = data.get("version", 1)
    if not isinstance(version, int) or version < 1:
        raise ConfigError(f"{source}: 'version' must be a whole number >= 1, not {version!r}.")
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{source} was written by a newer version of this extension (config version {version}, "
                          f"this one reads up to {SCHEMA_VERSION}); update the extension to use it.")
    data = dict(data)
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    data["version"] = SCHEMA_VERSION
    return data


def to_dict(config: TrainingConfig) -> dict[str, Any]:
    data: dict[str, Any] = {"version": SCHEMA_VERSION}
    data.update({f.name: getattr(config, f.name) for f in settings(TrainingConfig)})
    data["concepts"] = [dataclasses.asdict(c) for c in config.concepts]
    return data


def _build(cls: type, data: dict[str, Any], where: str, warn: Callable[[str], None]) -> Any:
    known = {f.name for f in settings(cls)}
    for key in data:
        if key not in known and key not in ("version", "concepts"):
            warn(f"{where}: unknown setting '{key}' ignored.")
    return cls(**{k: v for k, v in data.items() if k in known})


def from_dict(data: Any, source: str = "config", warn: Callable[[str], None] | None = None) -> TrainingConfig:
    """Build and validate a config from parsed JSON, warning by name about unknown keys."""
    warn = warn or log.warning
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings, found {type(data).__name__}.")
    data = migrate(data, source)
    concepts_raw = data.get("concepts", [])
    if not isinstance(concepts_raw, list):
        raise ConfigError(f"{source}: 'concepts' must be a list of objects.")
    if len(concepts_raw) > MAX_CONCEPTS:  # checked before building them: a huge list must fail fast
        raise ConfigError(f"{source}: 'concepts' has {len(concepts_raw):,} entries, more than the maximum "
                          f"{MAX_CONCEPTS}.")
    if not all(isinstance(c, dict) for c in concepts_raw):
        raise ConfigError(f"{source}: 'concepts' must be a list of objects.")
    config = _build(TrainingConfig, data, source, warn)
    config.concepts = [_build(Concept, c, f"{source} concept {i + 1}", warn) for i, c in enumerate(concepts_raw)]
    try:
        return validate(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def read_text_file(path: Path, what: str = "Config file") -> str:
    """The file's text (UTF-8, or UTF-16/32 with a byte-order mark as Windows writes), or a ConfigError."""
    try:
        return read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} {path} cannot be read ({error}).") from None


def load(path: str | Path, warn: Callable[[str], None] | None = None) -> TrainingConfig:
    path = Path(path)
    text = read_text_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"Config file {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                          f"{error.msg}); fix or delete it.") from None
    return from_dict(data, str(path), warn)


def save(config: TrainingConfig, path: str | Path) -> None:
    """Validate, then write atomically: a crash leaves the previous file intact."""
    validate(config)
    atomic.write_json(path, to_dict(config))
