"""Fake SD.Next modeldata: the model and refiner slots, loaded lazily on first use unless the lock is held."""

import threading


class ModelData:
    def __init__(self):
        self.sd_model = None
        self.sd_refiner = None
        self.locked = False  # SD.Next unlocks after start-up
        self.lock = threading.Lock()
        self.lazy_loads = 0

    def get_sd_model(self):
        if self.sd_model is None and not self.locked and not self.lock.locked():
            with self.lock:
                from modules import sd_models

                self.lazy_loads += 1
                sd_models.reload_model_weights(op="model")
        return self.sd_model


model_data = ModelData()
