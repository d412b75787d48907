"""Fixtures for the model tests: tiny demo checkpoints, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth.models.demo import write_demo_checkpoint


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny original-layout checkpoint per family (each in its own folder, SD2-v with its yaml)."""
    root = tmp_path_factory.mktemp("demo")
    files = {}
    for family in ("sd1", "sd2", "sd2v", "sdxl"):
        (root / family).mkdir()
        files[family] = write_demo_checkpoint(family, root / family / f"demo-{family}.safetensors")
    return files
