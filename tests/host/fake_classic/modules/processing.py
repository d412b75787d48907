"""Fake Forge Classic processing: txt2img fields without A1111 1.9's scheduler; records each object."""

from modules import shared

created = []


class Processed:
    def __init__(self, images, index_of_first_image=0):
        self.images = images
        self.index_of_first_image = index_of_first_image


class StableDiffusionProcessingTxt2Img:
    def __init__(self, sd_model=None, prompt="", negative_prompt="", sampler_name=None, batch_size=1, n_iter=1,
                 steps=50, cfg_scale=7.0, width=512, height=512, seed=-1, do_not_save_samples=False,
                 do_not_save_grid=False, override_settings=None, override_settings_restore_afterwards=True):
        self.kwargs = {name: value for name, value in locals().items() if name != "self"}
        self.closed = False
        created.append(self)

    def close(self):
        self.closed = True


def process_images(p):
    from PIL import Image

    if shared.sd_model is None:  # A1111's processing needs a loaded model
        raise AttributeError("'NoneType' object has no attribute 'sd_model_hash'")
    size = (p.kwargs["width"], p.kwargs["height"])
    return Processed([Image.new("RGB", size, ((p.kwargs["seed"] + i) % 256, 0, 0)) for i in range(p.kwargs["batch_size"])])
