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
from dreambooth.families import get_family
from dreambooth.world import build, model
from dreambooth.world.demo import DEMO_CONCEPT
from dreambooth.world.scenes import ALL_COLOURS, BACKGROUNDS, SHAPES, Scene, caption


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


def every_world_prompt() -> list[str]:
    """Every caption the world writes (each shape, colour, background, with and without dot, colour and background
    left out or not), the demo's prompts and the empty prompt classifier-free guidance uses."""
    scenes = [Scene(shape=shape, colour=colour, background=background, dot=dot) for shape in SHAPES
              for colour in ALL_COLOURS for background in BACKGROUNDS for dot in (False, True)]
    captions = {caption(scene, colour, background) for scene in scenes for colour in (False, True)
                for background in (False, True)}
    return sorted(captions | {DEMO_CONCEPT[key] for key in ("instance_prompt", "class_prompt", "sample_prompt")} | {""})


def test_the_compact_base_keeps_every_row_a_world_prompt_reads() -> None:
    tokenizer = get_family("sd1").tokenizers()[0]
    with safe_open(str(model.BASE_FILE), framework="pt") as handle:
        kept = set(handle.get_tensor(model.ROWS_KEY).tolist())
        assert model.EMBEDDING_KEY not in handle.keys()
    for prompt in every_world_prompt():
        used = set(tokenizer(prompt, padding="max_length").input_ids)
        assert used <= kept, f"{prompt!r} reads rows {sorted(used - kept)} the shipped base does not keep"


def test_the_written_checkpoint_has_the_kept_rows_and_the_same_fill_every_time(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    first = load_file(model.write_world_checkpoint(tmp_path / "first.safetensors"))
    second = load_file(model.write_world_checkpoint(tmp_path / "second.safetensors"))
    with safe_open(str(model.BASE_FILE), framework="pt") as handle:
        rows, values = handle.get_tensor(model.ROWS_KEY), handle.get_tensor(model.VALUES_KEY)
        others = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith("world_token_")}
    embedding = first[model.EMBEDDING_KEY]
    assert embedding.shape == (49408, 32) and embedding.dtype == values.dtype
    assert torch.equal(embedding[rows], values)
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert all(torch.equal(first[key], tensor) for key, tensor in others.items())
    # The drawn rows have CLIP's initial spread, not zeros or copies of one row.
    drawn = embedding[[index for index in range(len(embedding)) if index not in set(rows.tolist())]].float()
    assert 0.015 < drawn.std().item() < 0.025 and len(torch.unique(drawn[:100], dim=0)) == 100


def test_compact_and_full_embedding_are_inverse_on_the_kept_rows() -> None:
    tensors = {model.EMBEDDING_KEY: torch.randn(10, 4), "other": torch.ones(3)}
    compact = model.compact_embedding(dict(tensors), [0, 3, 9])
    assert model.EMBEDDING_KEY not in compact and torch.equal(compact["other"], tensors["other"])
    full = model.full_embedding(compact)[model.EMBEDDING_KEY]
    assert full.shape == (10, 4)
    assert torch.equal(full[[0, 3, 9]], tensors[model.EMBEDDING_KEY][[0, 3, 9]])
    assert not torch.equal(full[1], tensors[model.EMBEDDING_KEY][1])
