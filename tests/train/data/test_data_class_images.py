"""Class images: planning what is missing, generating through a host, reuse on rerun, interruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreambooth.errors import DataError
from dreambooth.host.base import GenerationRequest, Host, NullHostMixin
from dreambooth.store import Layout
from dreambooth.train.data import generate_class_images, plan_class_images, scan_dataset
from dreambooth.train.data.class_images import consecutive_runs


class FakeHost(NullHostMixin):
    """Solid-colour images whose colour encodes the seed; can be interrupted after N calls."""

    name = "fake"

    def __init__(self, root: Path, stop_after: int | None = None) -> None:
        self.layout = Layout.under(root)
        self.requests: list[GenerationRequest] = []
        self.stop_after = stop_after

    def list_checkpoints(self) -> list[Path]:
        return []

    def generate(self, request: GenerationRequest) -> list[Any]:
        self.requests.append(request)
        return [Image.new("RGB", (request.width, request.height), (request.seed + i + 1, 0, 0))
                for i in range(request.count)]

    def interrupted(self) -> bool:
        return self.stop_after is not None and len(self.requests) >= self.stop_after


@pytest.fixture
def setup(tmp_path: Path, make_image, config_for):
    make_image(tmp_path / "d" / "a.png")
    config = config_for("d", concept={"class_prompt": "photo of a dog", "class_negative_prompt": "blurry",
                                      "num_class_images": 5, "class_guidance_scale": 6.0,
                                      "class_infer_steps": 12}, with_prior_preservation=True)
    return config, tmp_path / "classifiers"


def test_fake_host_satisfies_the_protocol(tmp_path: Path) -> None:
    assert isinstance(FakeHost(tmp_path), Host)


def test_plan_counts_missing_and_names_by_prompt_and_seed(setup, make_image) -> None:
    config, root = setup
    [job] = plan_class_images(config, root)
    assert (job.missing, job.prompt, job.negative_prompt, job.seeds) == (5, "photo of a dog", "blurry",
                                                                        [0, 1, 2, 3, 4])
    assert len(set(job.file_names)) == 5 and all(n.endswith(f"-{s}.png") for n, s in zip(job.file_names,
                                                                                           job.seeds, strict=True))
    make_image(job.folder / "mine.jpg")                       # a user's own class image counts too
    assert plan_class_images(config, root)[0].missing == 4
    config.with_prior_preservation = False
    assert plan_class_images(config, root) == []


def test_generate_writes_missing_images_and_rerun_reuses_them(setup) -> None:
    config, root = setup
    host = FakeHost(root)
    progress: list[tuple[int, int]] = []
    assert generate_class_images(config, root, host, on_progress=lambda d, t: progress.append((d, t)),
                                 batch_size=2) == 5
    assert [r.count for r in host.requests] == [2, 2, 1]
    first = host.requests[0]
    assert (first.prompt, first.negative_prompt, first.cfg_scale, first.steps, first.width) == (
        "photo of a dog", "blurry", 6.0, 12, 64)
    assert progress[-1] == (5, 5)
    [folder] = [p for p in root.iterdir() if p.is_dir()]
    files = sorted(folder.glob("*.png"))
    assert len(files) == 5 and not list(folder.glob("*.tmp"))
    colours = {Image.open(f).getpixel((0, 0))[0] for f in files}
    assert colours == {1, 2, 3, 4, 5}                          # seeds 0..4, one file each
    assert "Seed: " in Image.open(files[0]).info["parameters"]
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert generate_class_images(config, root, FakeHost(root)) == 0
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    plan = scan_dataset(config, class_root=root)
    assert len(plan.class_images) == 5 and all(r.caption == "photo of a dog" for r in plan.class_images)


def test_raising_the_count_adds_new_seeds_only(setup) -> None:
    config, root = setup
    generate_class_images(config, root, FakeHost(root))
    config.concepts[0].num_class_images = 7
    [job] = plan_class_images(config, root)
    assert job.seeds == [5, 6]


def test_changed_prompt_uses_a_new_set(setup) -> None:
    config, root = setup
    generate_class_images(config, root, FakeHost(root))
    config.concepts[0].class_prompt = "photo of a cat"
    assert plan_class_images(config, root)[0].missing == 5


def test_interrupt_stops_between_batches_and_resume_continues(setup) -> None:
    config, root = setup
    assert generate_class_images(config, root, FakeHost(root, stop_after=1), batch_size=2) == 2
    [job] = plan_class_images(config, root)
    assert job.missing == 3 and job.seeds == [2, 3, 4]
    host = FakeHost(root)
    assert generate_class_images(config, root, host, batch_size=2) == 3
    assert [r.seed for r in host.requests] == [2, 4]


def test_unreadable_generated_file_is_not_overwritten(setup) -> None:
    config, root = setup
    [job] = plan_class_images(config, root)
    job.folder.mkdir(parents=True)
    broken = job.folder / job.file_names[0]
    broken.write_bytes(b"not a png")
    [job] = plan_class_images(config, root)
    assert job.missing == 5 and 0 not in job.seeds
    generate_class_images(config, root, FakeHost(root))
    assert broken.read_bytes() == b"not a png"


def test_missing_prompt_is_a_clear_error(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "a.png")
    config = config_for("d", concept={"num_class_images": 3}, with_prior_preservation=True)
    with pytest.raises(DataError, match="Concept 1.*class prompt"):
        plan_class_images(config, tmp_path / "cls")


def test_explicit_class_folder_is_created(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "a.png")
    target = tmp_path / "my classes" / "dög"
    config = config_for("d", concept={"class_token": "dog", "num_class_images": 2,
                                      "class_data_dir": str(target)}, with_prior_preservation=True)
    assert generate_class_images(config, tmp_path / "unused", FakeHost(tmp_path)) == 2
    assert len(list(target.glob("*.png"))) == 2


def test_consecutive_runs() -> None:
    assert consecutive_runs([0, 1, 2, 5, 6, 9], 2) == [[0, 1], [2], [5, 6], [9]]
    assert consecutive_runs([], 4) == []


class BlackFromSeed(FakeHost):
    """Renders black (a model computing NaN) from `seed` on."""

    def __init__(self, root: Path, seed: int) -> None:
        super().__init__(root)
        self.black_from = seed

    def generate(self, request: GenerationRequest) -> list[Any]:
        pictures = super().generate(request)
        return [Image.new("RGB", picture.size) if request.seed + i >= self.black_from else picture
                for i, picture in enumerate(pictures)]


def test_an_all_black_render_stops_the_class_images_and_is_not_kept(setup) -> None:
    config, root = setup
    with pytest.raises(DataError, match=r"all-black picture for the class prompt 'photo of a dog' \(seed 3\)"):
        generate_class_images(config, root, BlackFromSeed(root, 3), batch_size=2)
    [folder] = [p for p in root.iterdir() if p.is_dir()]
    assert sorted(f.name.rsplit("-", 1)[1] for f in folder.glob("*.png")) == ["0.png", "1.png", "2.png"]
    # A dark but not black picture is a picture.
    dark = FakeHost(root)
    assert generate_class_images(config, root, dark) == 2
