"""Fake processing: records each txt2img object and renders flat images coloured by seed."""

from modules import shared

created = []


class Processed:
    def __init__(self, images, index_of_first_image=0):
        self.images = images
        self.index_of_first_image = index_of_first_image


class StableDiffusionProcessingTxt2Img:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
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
