"""Fixtures of the host tests: a tiny sd1 model folder shared by the tests of one session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dreambooth.models.components import save_components
    from dreambooth.models.tiny import tiny_components

    folder = tmp_path_factory.mktemp("tiny") / "working"
    save_components(tiny_components("sd1", seed=0), folder)
    return folder


# Let the tests of this folder import tests_host_support (pytest's rootdir import mode does not add it).
sys.path.insert(0, str(Path(__file__).parent))
