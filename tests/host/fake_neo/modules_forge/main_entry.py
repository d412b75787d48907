"""Fake Forge Neo main_entry: checkpoint_change takes the UI preset as a required second parameter."""

from modules import shared

changes = []
refreshes = []


def checkpoint_change(ckpt_name, preset, save=True, refresh=True):
    changes.append((ckpt_name, preset, save, refresh))
    shared.opts.sd_model_checkpoint = ckpt_name
    return True


def refresh_model_loading_parameters(*, refresh=True):
    refreshes.append(refresh)
