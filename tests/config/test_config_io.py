"""Versioned JSON: round trip, unknown keys, migrations, newer versions and atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth import atomic
from dreambooth.config import io
from dreambooth.config.schema import SCHEMA_VERSION, Concept, TrainingConfig
from dreambooth.errors import ConfigError


def sample_config() -> TrainingConfig:
    return TrainingConfig(model_name="dog", model_family="sd2v", prediction_type="v_prediction",
                          learning_rate=3e-6, max_train_steps=800, use_ema=True, sample_prompts="a\nb",
                          concepts=[Concept(instance_data_dir="/data/dog", instance_prompt="photo of sks dog",
                                            num_class_images=200, sample_seed=7),
                                    Concept(instance_data_dir="/data/cat", repeats=3)])


def test_to_dict_from_dict_round_trip() -> None:
    config = sample_config()
    data = io.to_dict(config)
    assert data["version"] == SCHEMA_VERSION
    assert io.from_dict(json.loads(json.dumps(data))) == config


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "db_config.json"
    io.save(sample_config(), path)
    assert io.load(path) == sample_config()


def test_unknown_keys_warn_by_name() -> None:
    data = io.to_dict(sample_config())
    data["frobnicate"] = 3
    data["concepts"][1]["shiny"] = True
    warnings: list[str] = []
    config = io.from_dict(data, "my.json", warn=warnings.append)
    assert config == sample_config()
    assert any("'frobnicate'" in w and "my.json" in w for w in warnings)
    assert any("'shiny'" in w and "concept 2" in w for w in warnings)


def test_wrong_value_names_source_field_value_and_allowed() -> None:
    data = io.to_dict(sample_config())
    data["mixed_precision"] = "fp8"
    with pytest.raises(ConfigError) as caught:
        io.from_dict(data, "cfg.json")
    message = str(caught.value)
    assert all(part in message for part in ("cfg.json", "mixed_precision", "fp8", "bf16"))


@pytest.mark.parametrize(("concepts", "fragment"), [("none", "list of objects"), ([1, 2], "list of objects")])
def test_bad_concepts_are_refused(concepts: object, fragment: str) -> None:
    data = io.to_dict(TrainingConfig())
    data["concepts"] = concepts
    with pytest.raises(ConfigError, match=fragment):
        io.from_dict(data)


def test_non_object_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected a JSON object"):
        io.from_dict([1, 2], "x.json")


def test_version_1_max_steps_migrates_to_max_train_steps() -> None:
    config = io.from_dict({"version": 1, "max_steps": 321, "learning_rate": 1e-6})
    assert config.max_train_steps == 321


@pytest.mark.parametrize(("old", "new"), [(True, "on"), (False, "auto")])
def test_version_2_text_encoder_cache_flag_migrates_to_a_choice(old: bool, new: str) -> None:
    config = io.from_dict({"version": 2, "cache_text_encoder_outputs": old})
    assert config.cache_text_encoder_outputs == new


def test_missing_version_counts_as_version_1() -> None:
    warnings: list[str] = []
    config = io.from_dict({"max_steps": 55}, warn=warnings.append)
    assert config.max_train_steps == 55 and warnings == []


def test_migration_keeps_an_explicit_new_key() -> None:
    assert io.from_dict({"version": 1, "max_steps": 1, "max_train_steps": 2}).max_train_steps == 2


def test_every_older_version_has_a_migration() -> None:
    assert sorted(io.MIGRATIONS) == list(range(1, SCHEMA_VERSION))


def test_newer_version_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as caught:
        io.from_dict({"version": SCHEMA_VERSION + 1}, "future.json")
    message = str(caught.value)
    assert "future.json" in message and "newer version" in message and "update" in message


@pytest.mark.parametrize("version", [0, "2", 1.5, None])
def test_bad_version_is_refused(version: object) -> None:
    with pytest.raises(ConfigError, match="version"):
        io.from_dict({"version": version})


def test_load_reports_json_syntax_with_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "learning_rate": 1e-6,\n}\n')
    with pytest.raises(ConfigError) as caught:
        io.load(path)
    message = str(caught.value)
    assert str(path) in message and "line 3" in message


def test_load_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        io.load(tmp_path / "nope.json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\x80\x81garbage")  # no byte-order mark (\xff\xfe would read as UTF-16), not UTF-8
    with pytest.raises(ConfigError, match="cannot be read"):
        io.load(binary)


def test_failed_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "db_config.json"
    io.save(sample_config(), path)
    before = path.read_bytes()

    def half_write(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_write)
    changed = sample_config()
    changed.learning_rate = 9e-6
    with pytest.raises(OSError, match="No space"):
        io.save(changed, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["db_config.json"]


def test_save_refuses_invalid_config_without_touching_file(tmp_path: Path) -> None:
    path = tmp_path / "db_config.json"
    io.save(sample_config(), path)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="train_batch_size"):
        io.save(TrainingConfig(train_batch_size=0), path)
    assert path.read_bytes() == before


def test_save_goes_through_atomic_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = atomic.write_json
    monkeypatch.setattr(atomic, "write_json", lambda target, obj: (calls.append(Path(target)), real(target, obj)))
    io.save(TrainingConfig(), tmp_path / "c.json")
    assert calls == [tmp_path / "c.json"]
