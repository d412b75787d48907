"""Fake Forge version module: a plain string, Forge's version then the A1111 base."""

version = "2.0.1v1.10.1"
