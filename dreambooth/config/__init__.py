"""Training settings: the typed schema, its JSON form and imports of other tools' files."""

from .io import from_dict, load, save, to_dict
from .schema import SCHEMA_VERSION, Concept, TrainingConfig, validate

__all__ = ["SCHEMA_VERSION", "Concept", "TrainingConfig", "from_dict", "load", "save", "to_dict", "validate"]
