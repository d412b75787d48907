"""Fake Forge Classic version module."""

version = "classic"
