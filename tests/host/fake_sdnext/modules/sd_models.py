"""Fake SD.Next sd_models: checkpoint list, and unload/reload of the model and refiner slots."""

import os

from modules import shared
from modules.modeldata import model_data  # noqa: F401  (SD.Next re-exports it here)

calls = []
checkpoints_list = {}


class CheckpointInfo:
    def __init__(self, filename, name=None, sha=None, subfolder=None, model_type='checkpoint', folder=None):
        self.filename = filename
        self.name = os.path.splitext(os.path.basename(filename))[0]
        self.title = f"{self.name} [abc]"


class FakePipeline:
    def __init__(self, title):
        self.title = title
        self.device = "cpu"


def list_models():
    calls.append(("list_models",))
    checkpoints_list.clear()
    for root, _, files in os.walk(shared.cmd_opts.ckpt_dir):
        for name in sorted(files):
            if name.endswith((".safetensors", ".ckpt")):
                info = CheckpointInfo(os.path.join(root, name))
                checkpoints_list[info.title] = info


def unload_model_weights(op='model'):
    calls.append(("unload_model_weights", op))
    slot = "sd_model" if op in ("model", "dict") else "sd_refiner"
    pipeline = getattr(model_data, slot)
    if pipeline is not None:
        pipeline.device = "meta"
        setattr(model_data, slot, None)


def reload_model_weights(sd_model=None, info=None, op='model', force=False, revision=None):
    calls.append(("reload_model_weights", op))
    title = shared.opts.sd_model_checkpoint if op == "model" else shared.opts.sd_model_refiner
    if title in (None, "None"):
        return None
    setattr(model_data, "sd_model" if op == "model" else "sd_refiner", FakePipeline(title))
    return model_data.sd_model
