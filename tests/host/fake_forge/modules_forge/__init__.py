"""Fake Forge: importing it turns the fake A1111 sd_models into Forge's shape (see tests/host/facts/forge.json).

Forge keeps one lazily loaded model in model_data (a placeholder until the first generation), keyed by
forge_loading_parameters / forge_hash, and has no loaded_sd_models list.
"""

from modules_forge.shape import give_sd_models_forge_shape

give_sd_models_forge_shape()
