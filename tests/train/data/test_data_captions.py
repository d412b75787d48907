"""Captions: [filewords], token insertion, sidecar files, tag shuffling and caption dropout."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.train.data import BatchItem, ImageRecord, build_caption, scan_dataset
from dreambooth.train.data.captions import (
    caption_path,
    class_caption,
    estimated_tokens,
    insert_tokens,
    instance_caption,
    read_caption,
)


@pytest.mark.parametrize(("caption", "expected"), [
    ("a dog on grass", "a sks dog on grass"),          # before the class word
    ("a Dog on grass", "a sks Dog on grass"),          # any case
    ("a cat on grass", "sks dog, a cat on grass"),     # class absent: phrase in front
    ("sks sitting", "sks sitting"),                    # token already there
    ("a hotdog stand", "sks dog, a hotdog stand"),     # whole words only
])
def test_insert_tokens_rule(caption: str, expected: str) -> None:
    assert insert_tokens(caption, "sks", "dog") == expected


def test_filewords_substitution_and_no_double_token() -> None:
    concept = Concept(instance_prompt="photo of [filewords]", instance_token="sks", class_token="dog")
    assert instance_caption(concept, "a dog, smiling") == "photo of a sks dog, smiling"
    fixed = Concept(instance_prompt="photo of sks dog, [filewords]", instance_token="sks", class_token="dog")
    assert instance_caption(fixed, "on grass") == "photo of sks dog, on grass"


def test_missing_caption_falls_back_to_prompt_or_tokens() -> None:
    concept = Concept(instance_prompt="[filewords]", instance_token="sks", class_token="dog")
    assert instance_caption(concept, None) == "sks dog"
    plain = Concept(instance_prompt="photo of sks dog", instance_token="sks", class_token="dog")
    assert instance_caption(plain, "ignored caption") == "photo of sks dog"
    empty = Concept(instance_token="sks", class_token="dog")
    assert instance_caption(empty, None) == "sks dog"
    assert instance_caption(empty, "a dog running") == "a sks dog running"
    assert instance_caption(Concept(), None) == ""


def test_class_caption_inserts_class_token() -> None:
    concept = Concept(class_prompt="[filewords]", class_token="dog")
    assert class_caption(concept, "an animal in snow") == "dog, an animal in snow"
    assert class_caption(concept, "a dog in snow") == "a dog in snow"
    assert class_caption(Concept(class_prompt="photo of a dog", class_token="dog"), None) == "photo of a dog"


def test_sidecar_extension_preference(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    (tmp_path / "a.caption").write_text("from caption")
    assert caption_path(image, ".txt") == tmp_path / "a.caption"     # fallback to the other extension
    (tmp_path / "a.txt").write_text("from txt")
    assert caption_path(image, ".caption") == tmp_path / "a.caption"
    assert caption_path(image, ".txt") == tmp_path / "a.txt"


def test_read_caption_joins_lines_and_handles_latin1(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffline one\r\n\r\nline two\n".encode())
    assert read_caption(path) == ("line one, line two", None)
    path.write_bytes("caf\xe9".encode("latin-1"))
    text, warning = read_caption(path)
    assert text == "café" and warning and str(path) in warning


def _item(caption: str, seed: int) -> BatchItem:
    record = ImageRecord(Path("x.png"), caption, 0, False, None, (64, 64), "h")
    return BatchItem(record, (64, 64), False, (0, 0), seed)


def test_shuffle_keeps_first_tags_and_all_tags() -> None:
    config = TrainingConfig(shuffle_tags=True, keep_tokens=2)
    caption = "sks dog, red, blue, green, yellow, big"
    results = {build_caption(_item(caption, seed), config) for seed in range(40)}
    assert len(results) > 5
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["sks dog", "red"]
        assert sorted(tags) == sorted(caption.split(", "))
    unshuffled = TrainingConfig(shuffle_tags=False)
    assert build_caption(_item(caption, 3), unshuffled) == caption


def test_shuffle_is_deterministic_per_seed() -> None:
    config = TrainingConfig(shuffle_tags=True, keep_tokens=0)
    caption = "a, b, c, d, e, f, g"
    assert build_caption(_item(caption, 7), config) == build_caption(_item(caption, 7), config)


def test_caption_dropout_rate() -> None:
    config = TrainingConfig(caption_dropout=0.25)
    dropped = sum(build_caption(_item("sks dog", seed), config) == "" for seed in range(2000))
    assert 400 < dropped < 600
    assert all(build_caption(_item("sks dog", s), TrainingConfig(caption_dropout=0.0)) for s in range(50))
    assert all(build_caption(_item("sks dog", s), TrainingConfig(caption_dropout=1.0)) == "" for s in range(50))


def test_estimated_tokens_is_a_lower_bound_shape() -> None:
    assert estimated_tokens("a photo, of sks") == 5
    assert estimated_tokens("2024") == 4
    assert estimated_tokens("") == 0


def test_filewords_end_to_end(tmp_path: Path, make_image, config_for) -> None:
    make_image(tmp_path / "d" / "one.png")
    make_image(tmp_path / "d" / "two.png")
    (tmp_path / "d" / "one.txt").write_text("a dog, outdoors")
    config = config_for("d", concept={"instance_prompt": "[filewords]", "instance_token": "sks",
                                      "class_token": "dog"})
    captions = {r.path.name: r.caption for r in scan_dataset(config).instance}
    assert captions == {"one.png": "a sks dog, outdoors", "two.png": "sks dog"}
