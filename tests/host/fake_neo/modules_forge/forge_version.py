"""Fake Forge Neo version module: Neo names itself 'neo'."""

version = "neo"
