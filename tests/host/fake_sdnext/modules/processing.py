"""Fake SD.Next processing: txt2img takes any keyword (kept as attributes); no model means None."""

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
        self.model_title = None
        created.append(self)

    def close(self):
        self.closed = True


def process_images(p):
    from PIL import Image

    model = shared.sd_model  # loads lazily, unless the load lock is held
    if model is None:
        return None
    p.model_title = (p.kwargs.get("override_settings") or {}).get("sd_model_checkpoint", model.title)
    size = (p.kwargs["width"], p.kwargs["height"])
    return Processed([Image.new("RGB", size, ((p.kwargs["seed"] + i) % 256, 0, 0))
                      for i in range(p.kwargs["batch_size"])])
