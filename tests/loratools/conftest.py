"""LoRA-tool tests run on one intra-op thread: tiny models gain nothing from more."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Let the tests of this folder import lora_helpers (pytest's rootdir import mode does not add it).
sys.path.insert(0, str(Path(__file__).parent))
