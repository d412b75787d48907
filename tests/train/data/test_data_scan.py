"""Scanning: concepts, kohya folders, repeats, masks, class folders, validation split, preview."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth.errors import DataError
from dreambooth.train.data import dataset_preview, scan_dataset
from dreambooth.train.data.concepts import kohya_parts, prompt_folder_name


@pytest.mark.parametrize(("name", "parts"), [
    ("10_sks dog", (10, "sks", "dog")),
    ("3_ohwx black cat", (3, "ohwx", "black cat")),
    ("1_style", (1, "style", "")),
    ("dogs", None),
    ("10-sks dog", None),
])
def test_kohya_folder_names(name: str, parts) -> None:
    assert kohya_parts(name) == parts


def test_kohya_folders_become_concepts(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "train" / "10_sks dog" / "a.png")
    make_image(tmp_path / "train" / "10_sks dog" / "b.png")
    make_image(tmp_path / "train" / "3_ohwx cat" / "c.png")
    (tmp_path / "train" / "3_ohwx cat" / "c.txt").write_text("a cat on a sofa")
    (tmp_path / "train" / "notes").mkdir()
    plan = scan_dataset(config_for("train"))
    assert [(c.instance_token, c.class_token, c.repeats) for c in plan.concepts] == [("sks", "dog", 10),
                                                                                      ("ohwx", "cat", 3)]
    assert plan.repeats == {0: 10, 1: 3}
    captions = {r.path.name: (r.caption, r.concept_index) for r in plan.instance}
    assert captions == {"a.png": ("sks dog", 0), "b.png": ("sks dog", 0), "c.png": ("a ohwx cat on a sofa", 1)}
    assert [p.name for p, _ in plan.skipped] == ["notes"]
    assert "not read" in plan.skipped[0][1]


def test_kohya_loose_images_stay_a_concept_and_zero_repeat_folder_skipped(tmp_path: Path, make_image,
                                                                          config_for) -> None:
    make_image(tmp_path / "train" / "loose.png")
    make_image(tmp_path / "train" / "5_sks dog" / "a.png")
    make_image(tmp_path / "train" / "0_sks cat" / "b.png")
    plan = scan_dataset(config_for("train", concept={"instance_token": "zz", "class_token": "thing"}))
    assert [(c.instance_token, c.repeats) for c in plan.concepts] == [("zz", 1), ("sks", 5)]
    assert any(p.name == "0_sks cat" and "repeat count 0" in r for p, r in plan.skipped)


def test_kohya_class_subfolder_is_matched(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "train" / "2_sks dog" / "a.png")
    for i in range(3):
        make_image(tmp_path / "reg" / "1_dog" / f"r{i}.png")
    make_image(tmp_path / "reg" / "1_cat" / "c.png")
    config = config_for("train", concept={"class_data_dir": str(tmp_path / "reg")},
                        with_prior_preservation=True)
    plan = scan_dataset(config)
    assert sorted(r.path.name for r in plan.class_images) == ["r0.png", "r1.png", "r2.png"]
    assert all(r.is_class and r.caption == "dog" for r in plan.class_images)


def test_per_concept_repeats_and_indices(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "a" / "1.png")
    make_image(tmp_path / "b" / "2.png")
    config = config_for("a", "b")
    config.concepts[1].repeats = 7
    plan = scan_dataset(config)
    assert plan.repeats == {0: 1, 1: 7}
    assert [(r.path.name, r.concept_index) for r in plan.instance] == [("1.png", 0), ("2.png", 1)]


def test_masks_are_found_and_not_trained_as_images(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "a.png")
    make_image(tmp_path / "d" / "a-masklabel.png", mode="L", color=255)
    make_image(tmp_path / "d" / "b.png")
    warnings: list[str] = []
    plan = scan_dataset(config_for("d", masked_training=True), warn=warnings.append)
    masks = {r.path.name: r.mask_path for r in plan.instance}
    assert masks == {"a.png": tmp_path / "d" / "a-masklabel.png", "b.png": None}
    assert any("b.png" in w and "without a mask" in w for w in warnings)


def test_validation_split_is_deterministic_and_keeps_training_images(tmp_path: Path, make_image,
                                                                     config_for) -> None:
    for i in range(10):
        make_image(tmp_path / "d" / f"{i:02d}.png", color=(i * 20, 0, 0))
    plan = scan_dataset(config_for("d", validation_split=0.3))
    assert len(plan.validation) == 3 and len(plan.instance) == 7
    assert not {r.path for r in plan.validation} & {r.path for r in plan.instance}
    again = scan_dataset(config_for("d", validation_split=0.3))
    assert [r.path for r in again.validation] == [r.path for r in plan.validation]
    # Renaming files keeps the same images held out (the split follows the content).
    for record in plan.validation:
        record.path.rename(record.path.with_name("v_" + record.path.name))
    renamed = scan_dataset(config_for("d", validation_split=0.3))
    assert sorted(r.content_hash for r in renamed.validation) == sorted(r.content_hash for r in plan.validation)
    one = tmp_path / "single"
    make_image(one / "only.png")
    assert len(scan_dataset(config_for("single", validation_split=0.5)).instance) == 1


def test_class_images_from_model_class_root(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "a.png")
    concept = {"class_prompt": "photo of a dog", "num_class_images": 2}
    config = config_for("d", concept=concept, with_prior_preservation=True)
    root = tmp_path / "classifiers"
    folder = root / prompt_folder_name("photo of a dog")
    for i in range(3):
        make_image(folder / f"c{i}.png")
    plan = scan_dataset(config, class_root=root)
    assert [r.path.name for r in plan.class_images] == ["c0.png", "c1.png"]     # capped at the request
    config.with_prior_preservation = False
    assert scan_dataset(config, class_root=root).class_images == []
    config.with_prior_preservation, config.method = True, "finetune"
    assert scan_dataset(config, class_root=root).class_images == []


def test_zero_requested_uses_all_present_class_images(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "a.png")
    for i in range(4):
        make_image(tmp_path / "cls" / f"c{i}.png")
    config = config_for("d", concept={"class_data_dir": str(tmp_path / "cls")}, with_prior_preservation=True)
    assert len(scan_dataset(config).class_images) == 4


def test_missing_class_folder_is_reported_not_fatal(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "a.png")
    config = config_for("d", concept={"class_data_dir": str(tmp_path / "nope"), "num_class_images": 5,
                                      "class_prompt": "dog"}, with_prior_preservation=True)
    warnings: list[str] = []
    plan = scan_dataset(config, warn=warnings.append)
    assert plan.class_images == []
    assert any("5 of 5 class images are missing" in w and "nope" in w for w in warnings)
    preview = dataset_preview(config, None)
    assert preview[0]["class_missing"] == 5 and preview[0]["class_images"] == 0


@pytest.mark.parametrize("problem", ["empty_setting", "missing", "file", "empty_folder"])
def test_unusable_concept_folder_raises_naming_it(tmp_path: Path, make_image, config_for, problem: str) -> None:
    target = tmp_path / "d"
    if problem == "file":
        target.write_text("x")
    elif problem == "empty_folder":
        target.mkdir()
        (target / "readme.md").write_text("no images here")
    config = config_for("d")
    if problem == "empty_setting":
        config.concepts[0].instance_data_dir = ""
    with pytest.raises(DataError) as error:
        scan_dataset(config)
    message = str(error.value)
    assert "Concept 1" in message
    assert problem == "empty_setting" or str(target) in message


def test_no_concepts_raises() -> None:
    from dreambooth.config.schema import TrainingConfig

    with pytest.raises(DataError, match="No concepts"):
        scan_dataset(TrainingConfig())


def test_windows_path_hint(config_for) -> None:
    config = config_for("x")
    config.concepts[0].instance_data_dir = "C:\\Users\\me\\dogs"
    with pytest.raises(DataError, match="Windows path"):
        scan_dataset(config)


def test_preview_lists_counts_buckets_and_skips(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "wide.png", size=(128, 64))
    make_image(tmp_path / "d" / "square.png", size=(64, 64))
    make_image(tmp_path / "d" / "square2.png", size=(80, 80))
    (tmp_path / "d" / "square.txt").write_text("a caption")
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    config = config_for("d", extra_resolutions="128")
    rows = dataset_preview(config, None)
    assert len(rows) == 1
    row = rows[0]
    assert (row["images"], row["captions"], row["error"]) == (3, 1, None)
    assert set(row["buckets"]) == {64, 128}
    assert row["buckets"][64] == {"64x64": 3}       # min side capped at the resolution: one bucket
    assert row["buckets"][128]["128x128"] == 2 and sum(row["buckets"][128].values()) == 3
    assert [Path(p).name for p, _ in row["skipped"]] == ["broken.png"]


def test_preview_never_raises_for_a_missing_folder(tmp_path: Path, config_for) -> None:
    rows = dataset_preview(config_for("missing"), tmp_path / "cls")
    assert rows[0]["error"] and "does not exist" in rows[0]["error"]


def test_scan_leaves_files_untouched(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "bad.jpg").write_bytes(b"")
    (tmp_path / "d" / "trunc.png").write_bytes(make_image(tmp_path / "t.png").read_bytes()[:40])
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "d").iterdir()}
    warnings: list[str] = []
    plan = scan_dataset(config_for("d"), warn=warnings.append)
    assert len(plan.skipped) == 2
    assert any("bad.jpg" in w and "0-byte" in w for w in warnings) and any("trunc.png" in w for w in warnings)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "d").iterdir()} == before


def test_unreadable_folders_are_reported(tmp_path: Path, make_image, config_for, monkeypatch) -> None:
    make_image(tmp_path / "d" / "a.png")
    make_image(tmp_path / "cls" / "c.png")
    locked = {tmp_path / "d"}
    real_iterdir = Path.iterdir

    def iterdir(self: Path):
        if self in locked:
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match="cannot be read.*permissions"):
        scan_dataset(config_for("d"))
    locked.clear()
    locked.add(tmp_path / "cls")
    config = config_for("d", concept={"class_data_dir": str(tmp_path / "cls")}, with_prior_preservation=True)
    plan = scan_dataset(config)
    assert plan.class_images == [] and plan.skipped[0][0] == tmp_path / "cls"


def test_preview_shows_unread_kohya_siblings(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "train" / "4_sks dog" / "a.png")
    (tmp_path / "train" / "misc").mkdir()
    rows = dataset_preview(config_for("train"), None)
    assert [(r["instance_token"], r["repeats"]) for r in rows] == [("sks", 4)]
    assert any(p.endswith("misc") for p, _ in rows[0]["skipped"])


def test_a_concept_pointed_at_a_kohya_folder_itself_uses_its_name(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "10_sks dog" / "a.png")
    plan = scan_dataset(config_for("10_sks dog"))
    concept = plan.concepts[0]
    assert (concept.repeats, concept.instance_token, concept.class_token) == (10, "sks", "dog")
    assert plan.repeats == {0: 10} and plan.instance[0].caption == "sks dog"
    assert any("folder '10_sks dog'" in w and "repeats 10" in w for w in plan.warnings)
    # Settings the user gave win, and the note says the name was not followed there.
    kept = scan_dataset(config_for("10_sks dog", concept={"repeats": 3, "instance_token": "zwx"}))
    assert (kept.concepts[0].repeats, kept.concepts[0].instance_token, kept.concepts[0].class_token) == (3, "zwx",
                                                                                                          "dog")
    assert any("repeats 3 (the name says 10)" in w for w in kept.warnings)
    preview = dataset_preview(config_for("10_sks dog"), None)
    assert preview[0]["repeats"] == 10 and any("kohya" in w for w in preview[0]["warnings"])


def test_a_kohya_subfolder_without_a_class_word_is_named_in_the_error(tmp_path: Path, make_image,
                                                                      config_for) -> None:
    from dreambooth.train.data import plan_class_images

    make_image(tmp_path / "train" / "5_sks dog" / "a.png")
    make_image(tmp_path / "train" / "3_ohwx" / "b.png")
    config = config_for("train", concept={"num_class_images": 4, "class_prompt": "photo of a dog",
                                          "class_token": "dog"}, with_prior_preservation=True)
    with pytest.raises(DataError, match=r"^Concept 1, folder '3_ohwx': .*no class prompt.*'3_ohwx dog'"):
        plan_class_images(config, tmp_path / "classes")


def test_tiny_and_extreme_images_are_counted_in_the_preview(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "ok.png", size=(64, 64))
    make_image(tmp_path / "d" / "tiny.png", size=(16, 16))
    make_image(tmp_path / "d" / "dot.png", size=(1, 1))
    make_image(tmp_path / "d" / "strip.png", size=(1000, 10))
    row = dataset_preview(config_for("d", bucket_min_resolution=16), None)[0]
    small = [w for w in row["warnings"] if "far below the training resolution" in w]
    extreme = [w for w in row["warnings"] if "extreme aspect ratio" in w]
    assert len(small) == 1 and "3 of 4 image(s)" in small[0] and "dot.png at 1x1, upscaled 64x" in small[0]
    assert len(extreme) == 1 and "1 of 4 image(s)" in extreme[0] and "strip.png" in extreme[0]
    assert not [w for w in small + extreme if "ok.png" in w]


def test_symlink_loops_and_dangling_image_links_are_reported(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "loop.png").symlink_to(tmp_path / "d" / "loop.png")
    (tmp_path / "d" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    warnings: list[str] = []
    plan = scan_dataset(config_for("d"), warn=warnings.append)
    assert len(plan.instance) == 1
    reasons = {p.name: r for p, r in plan.skipped}
    assert "loops back on itself" in reasons["loop.png"] and "does not exist" in reasons["gone.png"]
    assert sum("loop.png" in w for w in warnings) == 1
