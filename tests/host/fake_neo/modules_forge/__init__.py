"""Fake Forge Neo (tests/host/facts/neo.json): the fake Forge's modules_forge with Neo's main_entry and version.

Neo's sd_models keeps none of A1111's stubs (send_model_to_trash, load_model, reload_model_weights, the
state-dict cache); its other modules the adapter uses are Forge's.
"""

import os

from modules import sd_models

__path__.append(os.path.join(os.path.dirname(__file__), "..", "..", "fake_forge", "modules_forge"))

from modules_forge.shape import give_sd_models_forge_shape  # noqa: E402  (found through the path above)

give_sd_models_forge_shape()
for name in ("send_model_to_trash", "load_model", "reload_model_weights", "checkpoints_loaded"):
    if hasattr(sd_models, name):
        delattr(sd_models, name)
