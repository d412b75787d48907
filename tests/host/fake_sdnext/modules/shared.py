"""Fake SD.Next shared: folders copied from opts into cmd_opts, --auth users, sd_model loading lazily."""

import sys
import types

# SD.Next fills cmd_opts.ckpt_dir / lora_dir from its settings unless a flag gave them (relative to its folder).
cmd_opts = types.SimpleNamespace(ckpt_dir="models/Stable-diffusion", lora_dir="models/Lora", auth=None,
                                 auth_file=None, api_auth=None, dreambooth_models_path=None,
                                 dreambooth_data_roots=None)
opts = types.SimpleNamespace(sd_model_checkpoint="base [abc]", sd_model_refiner="None",
                             ckpt_dir="models/Stable-diffusion", lora_dir="models/Lora")
models_path = "models"


class State:
    """SD.Next's State has no stopping_generation (A1111's 'stop after this image')."""

    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None


state = State()


class _Shared(types.ModuleType):
    @property
    def sd_model(self):
        from modules.modeldata import model_data

        return model_data.get_sd_model()


sys.modules[__name__].__class__ = _Shared


class OptionInfo:
    def __init__(self, default=None, label='', component=None, component_args=None, onchange=None, section=None,
                 refresh=None, folder=False, submit=None, comment_before='', comment_after='', category_id=None,
                 *args, **kwargs):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


def _add_option(key, info):
    added[key] = info
    setattr(opts, key, info.default)


added = {}
opts.add_option = _add_option
