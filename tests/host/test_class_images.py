"""Class image generation through a host: folders, counts, seeds, atomic files, resume and interrupt."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.host.class_images import (
    class_folder,
    consecutive_runs,
    free_indices,
    generate_missing,
    missing_jobs,
    slug,
)
from dreambooth.host.fake import FakeHost, seed_colour
from dreambooth.store import Layout, ModelStore


@pytest.fixture
def setup(tmp_path: Path):
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    model = store.model("cat")
    config = TrainingConfig(seed=100, resolution=64, concepts=[
        Concept(class_prompt="photo of a cat", num_class_images=5, class_infer_steps=3, class_guidance_scale=6.0)])
    model.save_config(config)
    return model, config, FakeHost(store.layout)


def test_generates_missing_images_with_captions_and_seeds(setup):
    model, config, host = setup
    written = generate_missing(model, config, host, batch_size=2)
    folder = model.class_images / "photo_of_a_cat"
    assert written == [folder / f"class_{i:05d}.png" for i in range(5)]
    assert [r.count for r in host.requests] == [2, 2, 1] and [r.seed for r in host.requests] == [100, 102, 104]
    first = host.requests[0]
    assert (first.steps, first.cfg_scale, first.width, first.prompt) == (3, 6.0, 64, "photo of a cat")
    assert Image.open(written[3]).getpixel((0, 0)) == seed_colour(103)
    assert (folder / "class_00003.txt").read_text().strip() == "photo of a cat"
    assert missing_jobs(model, config) == []
    assert generate_missing(model, config, host) == [] and len(host.requests) == 3


def test_resume_fills_gaps_without_overwriting(setup):
    model, config, host = setup
    folder = class_folder(model, config.concepts[0])
    folder.mkdir(parents=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / "class_00001.png")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / "mine.jpg")
    written = generate_missing(model, config, host, batch_size=4)
    assert sorted(p.name for p in written) == ["class_00000.png", "class_00002.png", "class_00003.png"]
    assert Image.open(folder / "class_00001.png").getpixel((0, 0)) == (1, 2, 3)
    assert [(r.seed, r.count) for r in host.requests] == [(100, 1), (102, 2)]


def test_interrupt_keeps_finished_images(setup):
    model, config, host = setup
    calls = iter([False, True])
    written = generate_missing(model, config, host, interrupted=lambda: next(calls), batch_size=2)
    assert len(written) == 2 and all(p.is_file() for p in written)
    assert missing_jobs(model, config)[0].missing == 3


def test_no_jobs_without_prior_preservation(setup):
    model, config, host = setup
    config.with_prior_preservation = False
    assert missing_jobs(model, config) == []


def test_empty_class_prompt_is_a_config_error(setup):
    model, config, _ = setup
    config.concepts[0].class_prompt = ""
    with pytest.raises(ConfigError, match="Concept 1"):
        missing_jobs(model, config)


def test_request_names_the_model_folder_and_base_checkpoint(setup):
    model, config, host = setup
    (model.working).mkdir(parents=True)
    (host.layout.checkpoints_dir / "base.safetensors").write_bytes(b"x")
    config.base_checkpoint = "base.safetensors"
    config.concepts[0].num_class_images = 1
    generate_missing(model, config, host)
    assert host.requests[0].model_dir == model.working
    assert host.requests[0].checkpoint == host.layout.checkpoints_dir / "base.safetensors"


def test_helpers():
    assert slug("Photo of a  Dog!") == "photo_of_a_dog" and slug("***") == "class"
    assert consecutive_runs([0, 1, 2, 5, 6], 2) == [(0, 2), (2, 1), (5, 2)]
    assert consecutive_runs([], 3) == []


def test_free_indices_skips_existing(tmp_path):
    (tmp_path / "class_00000.png").write_bytes(b"")
    (tmp_path / "class_00002.png").write_bytes(b"")
    assert free_indices(tmp_path, 3) == [1, 3, 4]
