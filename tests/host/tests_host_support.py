"""Helpers shared by the web UI tests: where the fakes live and how to forget them."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
FAKE_PACKAGES = ("modules", "networks", "modules_forge", "backend", "installer", "ldm_patched")


def purge_fakes() -> None:
    """Drop the fake web UI modules from sys.modules so each test imports them fresh."""
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_PACKAGES:
            del sys.modules[name]
