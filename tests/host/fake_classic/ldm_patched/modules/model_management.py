"""Fake ldm_patched memory manager of Forge Classic: records what is freed."""

calls = []


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")
