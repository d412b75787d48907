"""User-facing errors: each names the file or setting involved and what to do about it."""

from __future__ import annotations


class DreamboothError(Exception):
    """An error the user can fix; its message is shown as one line, without a traceback."""


class ConfigError(DreamboothError):
    """A setting has a wrong value, or a config file cannot be read."""


class ModelError(DreamboothError):
    """A checkpoint or model folder cannot be used."""


class DataError(DreamboothError):
    """Training images, captions or concept folders are unusable."""


class TrainingError(DreamboothError):
    """Training stopped for a reason the user can act on (NaN loss, out of memory, disk full)."""
