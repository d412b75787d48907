"""Fake SD.Next lora_load: list_available_networks rescans cmd_opts.lora_dir."""

refreshed = []


def list_available_networks():
    refreshed.append(True)
    return {}
