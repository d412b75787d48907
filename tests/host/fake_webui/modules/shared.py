"""Fake modules.shared: cmd_opts, opts, state, and sd_model read through model_data as in A1111."""

import sys
import types

cmd_opts = types.SimpleNamespace(ckpt_dir=None, lora_dir=None, api_auth=None, dreambooth_models_path=None,
                                 dreambooth_data_roots=None)
opts = types.SimpleNamespace(sd_model_checkpoint="base.safetensors [abc]")
models_path = None  # tests set it


class State:
    def __init__(self):
        self.interrupted = False
        self.stopping_generation = False
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None


state = State()


class _Shared(types.ModuleType):
    @property
    def sd_model(self):
        import modules.sd_models

        return modules.sd_models.model_data.sd_model


sys.modules[__name__].__class__ = _Shared


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before='', comment_after='', infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


def _add_option(key, info):
    added[key] = info
    setattr(opts, key, info.default)


added = {}
opts.add_option = _add_option
