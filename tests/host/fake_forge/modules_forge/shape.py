"""The fake A1111 sd_models turned into Forge's shape (used by the fake Forge and the fake Forge Neo)."""

from modules import sd_models


class FakeInitialModel:
    """Forge's stand-in for extensions that read shared.sd_model before any model was loaded."""

    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, value):
        self.sd_model = value


def give_sd_models_forge_shape() -> None:
    sd_models.FakeInitialModel = FakeInitialModel
    sd_models.model_data = SdModelData()

