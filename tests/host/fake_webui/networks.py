"""Fake of the built-in Lora extension's networks module."""

refreshed = []


def list_available_networks():
    refreshed.append(True)
