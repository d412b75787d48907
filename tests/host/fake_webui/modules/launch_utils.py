"""Fake launch_utils: git_tag() as in A1111 1.10 (Forge's prefixes 'f' and its own version)."""


def git_tag():
    return "v1.10.1"
