"""Fake Forge main_entry: checkpoint_change(name, save=True, refresh=True) as in Forge for gradio 4."""

from modules import shared

changes = []
refreshes = []


def checkpoint_change(ckpt_name, save=True, refresh=True):
    changes.append((ckpt_name, save, refresh))
    shared.opts.sd_model_checkpoint = ckpt_name
    return True


def refresh_model_loading_parameters():
    refreshes.append(True)
