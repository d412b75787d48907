"""Fake processing: records each txt2img object and renders flat images coloured by seed."""

from modules import shared

created = []


class Processed:
    def __init__(self, images, index_of_first_image=0):
        self.images = images
        self.index_of_first_image = index_of_first_image


class StableDiffusionProcessingTxt2Img:
    """Keyword parameters as fields of the real dataclass (A1111 1.10 and Forge); an unknown one is a TypeError."""

    def __init__(self, sd_model=None, prompt="", negative_prompt="", sampler_name=None, scheduler=None,
                 batch_size=1, n_iter=1, steps=50, cfg_scale=7.0, width=512, height=512, seed=-1,
                 do_not_save_samples=False, do_not_save_grid=False, override_settings=None,
                 override_settings_restore_afterwards=True):
        self.kwargs = {name: value for name, value in locals().items() if name != "self"}
        self.closed = False
        self.checkpoint_during_processing = None
        created.append(self)

    def close(self):
        self.closed = True


def process_images(p):
    from PIL import Image

    p.checkpoint_during_processing = (p.kwargs.get("override_settings") or {}).get(
        "sd_model_checkpoint", shared.opts.sd_model_checkpoint)
    size = (p.kwargs["width"], p.kwargs["height"])
    images = [Image.new("RGB", size, ((p.kwargs["seed"] + i) % 256, 0, 0)) for i in range(p.kwargs["batch_size"])]
    if len(images) > 1:  # A1111 puts a grid first when 'return grid' is on
        return Processed([Image.new("RGB", size, (0, 0, 255))] + images, index_of_first_image=1)
    return Processed(images)
