"""Fake sd_models: checkpoint list from --ckpt-dir or models/Stable-diffusion, model_data, trash/load."""

import os
import threading

from modules import shared

calls = []
checkpoints_list = {}
checkpoints_loaded = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.title = f"{self.name} [abc]"


class FakeModel:
    def __init__(self, info):
        self.sd_checkpoint_info = info
        self.device = "cuda"


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.lock = threading.Lock()  # held while A1111 loads its first model lazily


model_data = SdModelData()


def model_path():
    return os.path.join(shared.models_path, "Stable-diffusion")


def list_models():
    calls.append(("list_models",))
    checkpoints_list.clear()
    for folder in filter(None, [model_path(), shared.cmd_opts.ckpt_dir]):
        for root, _, files in os.walk(folder):
            for name in sorted(files):
                if name.endswith((".safetensors", ".ckpt")):
                    info = CheckpointInfo(os.path.join(root, name))
                    checkpoints_list[info.title] = info
    ckpt = getattr(shared.cmd_opts, "ckpt", None)
    if ckpt and os.path.exists(ckpt):  # as A1111 1.10: every refresh selects the --ckpt file again
        shared.opts.sd_model_checkpoint = CheckpointInfo(ckpt).title


def send_model_to_trash(m):
    calls.append(("send_model_to_trash", m))
    m.device = "meta"


def unload_model_weights(sd_model=None, info=None):
    calls.append(("unload_model_weights",))
    model_data.sd_model = None


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """Loads the checkpoint selected in opts (the first one when none matches), as A1111 does."""
    calls.append(("reload_model_weights",))
    if info is None:
        list_models()
        infos = list(checkpoints_list.values())
        info = next((i for i in infos if i.title == shared.opts.sd_model_checkpoint), infos[0] if infos else None)
    if info is not None:
        model_data.sd_model = FakeModel(info)


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    calls.append(("load_model", checkpoint_info))
    model_data.sd_model = FakeModel(checkpoint_info)
    model_data.loaded_sd_models = [model_data.sd_model]
    return model_data.sd_model
