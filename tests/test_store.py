"""Model store: safe names, paths that stay inside the models folder, listing."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreambooth.config.schema import TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.store import CONFIG_FILE, Layout, ModelStore, check_model_name


@pytest.mark.parametrize("name", ["my-dog", "Dog 2", "v1.5_style", "a", "x(1)+[b]", "a" * 100, "con-artist",
                                  "nulled"])
def test_good_names_pass(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", [
    "", "   ", "a/b", "a\\b", "..", "a..b", "../up", "/abs", "C:\\x", "C:x", ".hidden", "-dash", "a" * 101,
    "CON", "con", "nul.txt", "Com1", "LPT9.log", "aux", "trailing.", "trailing ", "tab\tname", "new\nline",
    "name\n", "emoji😀", "star*", "what?", "pipe|", "quote\"", "colon:", "<lt>", "\x00nul",
    "a\u2215b", "a\uff0fb", "\u200bzero-width", "right\u202eleft", "狗" * 67, "CON.текст", "\u0301accent-first",
])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        check_model_name(name)


@pytest.mark.parametrize("name", ["мой-пёс", "我的狗", "犬のモデル", "कुत्ता", "σκύλος 2", "كلب", "café_v1.5",
                                  "狗" * 66])
def test_names_in_any_script_pass(name: str, tmp_path: Path) -> None:
    assert check_model_name(name) == name
    store = ModelStore(Layout.under(tmp_path / "models").ensure())
    store.model(name).save_config(TrainingConfig())
    assert store.names() == [name] and store.existing(name).load_config().model_name == name


def test_decomposed_names_are_stored_composed() -> None:
    assert check_model_name("cafe\u0301") == "caf\u00e9"


def test_non_string_is_refused() -> None:
    with pytest.raises(ConfigError):
        check_model_name(None)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(Layout.under(tmp_path / "models").ensure())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_any_name_is_refused_or_stays_inside(tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    root = tmp_path_factory.getbasetemp() / "hypothesis-store"
    store = ModelStore(Layout.under(root))
    try:
        model = store.model(name)
    except ConfigError:
        return
    base = store.layout.dreambooth_dir.resolve()
    assert model.root.parent == base and model.root.name == unicodedata.normalize("NFC", name)
    for path in (model.config_path, model.working, model.samples, model.snapshots, model.class_images):
        assert path.resolve().is_relative_to(base)


def test_symlink_out_of_the_store_is_refused(store: ModelStore, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (store.layout.dreambooth_dir / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="outside"):
        store.model("link")


def test_names_lists_only_models_with_a_config(store: ModelStore) -> None:
    assert store.names() == []
    store.model("b").save_config(TrainingConfig())
    store.model("a").save_config(TrainingConfig())
    (store.layout.dreambooth_dir / "no-config").mkdir()
    (store.layout.dreambooth_dir / "stray.txt").write_text("x")
    assert store.names() == ["a", "b"]


def test_names_of_a_missing_folder(tmp_path: Path) -> None:
    assert ModelStore(Layout.under(tmp_path / "absent")).names() == []


def test_save_config_records_the_folder_name(store: ModelStore) -> None:
    model = store.model("dog")
    model.save_config(TrainingConfig(model_name="something else", learning_rate=4e-6))
    loaded = store.existing("dog").load_config()
    assert (loaded.model_name, loaded.learning_rate) == ("dog", 4e-6)
    assert model.config_path == store.layout.dreambooth_dir.resolve() / "dog" / CONFIG_FILE


def test_existing_names_the_known_models(store: ModelStore) -> None:
    store.model("cat").save_config(TrainingConfig())
    with pytest.raises(ConfigError, match=r"No model named 'dog'.*cat"):
        store.existing("dog")


def test_delete(store: ModelStore) -> None:
    store.model("dog").save_config(TrainingConfig())
    (store.model("dog").samples).mkdir()
    store.delete("dog")
    assert store.names() == [] and not store.model("dog").root.exists()
    with pytest.raises(ConfigError):
        store.delete("dog")


def test_layout_defaults(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path, lora_dir=tmp_path / "L")
    assert layout.checkpoints_dir == tmp_path / "Stable-diffusion"
    assert layout.lora_dir == tmp_path / "L" and layout.dreambooth_dir == tmp_path / "dreambooth"
    layout.ensure()
    assert all(p.is_dir() for p in (layout.checkpoints_dir, layout.lora_dir, layout.dreambooth_dir))


def test_relative_concept_folders_never_depend_on_the_training_processes_folder(
        store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from dreambooth.config.schema import Concept

    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    monkeypatch.chdir(work)
    model = store.model("dog")
    model.save_config(TrainingConfig(concepts=[Concept(instance_data_dir="photos", class_data_dir="../classes/dog",
                                                       instance_prompt="sks dog")]))
    stored = json.loads(model.config_path.read_text())["concepts"][0]
    assert stored["instance_data_dir"] == str(work / "photos")  # saved absolute, where the user typed it
    assert stored["class_data_dir"] == str(tmp_path / "classes" / "dog")
    # Written by hand into the file: relative to the model's folder, whatever the current folder.
    stored["instance_data_dir"] = "images"
    data = json.loads(model.config_path.read_text())
    data["concepts"][0] = stored
    model.config_path.write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    assert model.load_config().concepts[0].instance_data_dir == str(model.root / "images")
    # A Windows path read on another system stays as written, for the scan to name.
    model.save_config(TrainingConfig(concepts=[Concept(instance_data_dir="D:\\train\\dog")]))
    assert model.load_config().concepts[0].instance_data_dir == "D:\\train\\dog"
