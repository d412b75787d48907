"""Fake Forge Classic: modules_forge without Forge 2's main_entry; A1111's model loading is kept."""
