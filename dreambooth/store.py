"""The model store: `<models>/dreambooth/<name>/` with config, diffusers weights, samples, logs, snapshots.

Names are validated so that nothing can be read or written outside the models folder.
"""

from __future__ import annotations

import os
import shutil
import unicodedata
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from .config import TrainingConfig, load, save
from .errors import ConfigError

CONFIG_FILE = "db_config.json"
CONCEPT_FOLDERS = ("instance_data_dir", "class_data_dir")
# Punctuation allowed in a model name besides letters, marks and digits of any script.
_NAME_PUNCTUATION = frozenset(" ._+-()[]")
_NAME_CHARACTERS, _NAME_BYTES = 100, 200  # exports append '_N.safetensors'; file systems allow 255 bytes
# Names Windows refuses as file names whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def _name_character(character: str) -> bool:
    # Letters (L*), combining marks (M*, needed by Devanagari, Thai, ...) and digits (N*) of any script.
    return unicodedata.category(character)[0] in "LMN" or character in _NAME_PUNCTUATION


def check_model_name(name: str) -> str:
    """`name` (NFC-normalised) if it is a safe folder name, else raise ConfigError saying what is allowed.

    Letters and digits of any script are allowed; path tricks are not: separators, '..', control characters,
    a leading dot or symbol, a trailing dot or space, and names Windows reserves (CON, NUL, COM1, ...).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("Model name is empty; give the model a name such as 'my-dog'.")
    name = unicodedata.normalize("NFC", name)
    stem = name.split(".")[0].strip().lower()
    if (not all(map(_name_character, name)) or not name[0].isalnum() or ".." in name
            or name.endswith((".", " ")) or stem in _RESERVED or len(name) > _NAME_CHARACTERS
            or len(name.encode("utf-8")) > _NAME_BYTES):
        raise ConfigError(f"Model name {name!r} is not allowed: use letters (any script), digits, spaces and "
                          ". _ - + ( ) [ ], start with a letter or digit, no path separators or '..', at most "
                          f"{_NAME_CHARACTERS} characters.")
    return name


def absolute_folders(config: TrainingConfig, base: Path) -> None:
    """Make the concepts' relative instance and class folders absolute against `base` (in place).

    A Windows path read on another system ('D:\\train') is left as written: joined to `base` it would only
    hide the real problem, which the dataset scan names."""
    for concept in config.concepts:
        for name in CONCEPT_FOLDERS:
            raw = getattr(concept, name)
            if not raw.strip() or "\\" in raw or PureWindowsPath(raw).drive:
                continue
            path = Path(raw).expanduser()
            if not path.is_absolute():
                setattr(concept, name, os.path.normpath(base / path))


@dataclass(frozen=True)
class Layout:
    """The host's folder layout under one models root (A1111: `<webui>/models`)."""

    models_dir: Path
    checkpoints_dir: Path
    lora_dir: Path
    dreambooth_dir: Path

    @classmethod
    def under(cls, models_dir: str | Path, checkpoints_dir: str | Path | None = None,
              lora_dir: str | Path | None = None, dreambooth_dir: str | Path | None = None) -> Layout:
        root = Path(models_dir)
        return cls(root, Path(checkpoints_dir or root / "Stable-diffusion"), Path(lora_dir or root / "Lora"),
                   Path(dreambooth_dir or root / "dreambooth"))

    def ensure(self) -> Layout:
        for folder in (self.checkpoints_dir, self.lora_dir, self.dreambooth_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


@dataclass(frozen=True)
class ModelDir:
    """Paths of one trainable model."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def working(self) -> Path:
        return self.root / "working"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logging(self) -> Path:
        return self.root / "logging"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def class_images(self) -> Path:
        return self.root / "classifiers"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> TrainingConfig:
        """The settings; a relative concept folder written into the file by hand is read relative to this
        model's folder (never to the current folder of whichever process trains)."""
        config = load(self.config_path)
        absolute_folders(config, self.root)
        return config

    def save_config(self, config: TrainingConfig) -> None:
        """Save `config` (in place: its name, and relative concept folders made absolute against the current
        folder, where the user typed them)."""
        config.model_name = self.name
        absolute_folders(config, Path.cwd())
        save(config, self.config_path)

    def writer_lock(self, purpose: str, warn: Callable[[str], None] | None = None) -> ContextManager[Any]:
        """Hold this model for `purpose` ("train", "export") across processes; see dreambooth.locks."""
        from .locks import writer_lock

        return writer_lock(self.root, purpose, warn)


class ModelStore:
    """All trainable models of one layout."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def model(self, name: str) -> ModelDir:
        root = (self.layout.dreambooth_dir / check_model_name(name)).resolve()
        base = self.layout.dreambooth_dir.resolve()
        if root.parent != base:
            raise ConfigError(f"Model name {name!r} resolves outside {base}; choose a plain name.")
        return ModelDir(root)

    def existing(self, name: str) -> ModelDir:
        model = self.model(name)
        if not model.exists():
            known = ", ".join(self.names()) or "none yet"
            raise ConfigError(f"No model named {name!r} in {self.layout.dreambooth_dir} (models: {known}); "
                              "create it first.")
        return model

    def names(self) -> list[str]:
        folder = self.layout.dreambooth_dir
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / CONFIG_FILE).is_file())

    def delete(self, name: str) -> None:
        shutil.rmtree(self.existing(name).root)


def unused_path(folder: Path, stem: str, suffix: str = ".safetensors") -> Path:
    """`folder/stem.suffix`, or stem_2, stem_3, ... when taken: an export never replaces an earlier file."""
    candidate = folder / f"{stem}{suffix}"
    number = 2
    while candidate.exists():
        candidate = folder / f"{stem}_{number}{suffix}"
        number += 1
    return candidate
