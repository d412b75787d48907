"""The world's shipped files are the recorded build, and the build is reproducible.

A full build takes minutes (python -m dreambooth.world.build); here a shortened one (a few steps of each
training) runs twice and must give the same bytes, and the shipped files must carry the recipe the script
builds with today.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreambooth.errors import ModelError
from dreambooth.world import build, model


def test_the_shipped_files_are_the_recorded_build_of_todays_recipe() -> None:
    record = model.shipped_record()
    assert record["recipe"] == asdict(build.Recipe()), "the script's recipe changed: rebuild the world"
    for path in (model.BASE_FILE, model.EVALUATOR_FILE):
        assert record["digest"][path.name] == model.digest(path)


def test_the_shipped_checkpoint_carries_the_world_configs() -> None:
    with safe_open(str(model.BASE_FILE), framework="pt") as handle:
        configs = json.loads(handle.metadata()["dreambooth_configs"])
    expected = model.world_configs(configs["vae"]["scaling_factor"])
    for part, config in expected.items():
        assert {key: configs[part][key] for key in config} == config, part


def test_a_shortened_build_gives_the_same_bytes_twice_and_the_evaluator_stage_alone_too(tmp_path: Path) -> None:
    recipe = build.Recipe().quick()
    first = build.build(recipe, tmp_path / "first", log=lambda text: None)
    second = build.build(recipe, tmp_path / "second", log=lambda text: None)
    assert first == second
    # The evaluator depends only on the base file and the recipe: retraining it alone gives the same bytes.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / build.BASE_NAME).write_bytes((tmp_path / "first" / build.BASE_NAME).read_bytes())
    assert build.build(recipe, tmp_path / "again", log=lambda text: None, base=False) == first


def test_the_build_leaves_torch_settings_as_they_were(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    with build.deterministic(3):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def test_a_changed_shipped_file_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    swapped = tmp_path / model.BASE_FILE.name
    swapped.write_bytes(model.BASE_FILE.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(model, "BASE_FILE", swapped)
    with pytest.raises(ModelError, match="differs from the recorded build"):
        model.write_world_checkpoint(tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
