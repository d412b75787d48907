"""Shared test options: slow real-architecture tests run only with --runslow."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Test doubles shared by several folders (fake_host.py) are imported by name from here.
TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run real-architecture tests that take minutes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    marker = pytest.mark.skip(reason="slow: real-architecture run, enable with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(marker)
