"""kohya sd-scripts' dataset config (TOML) imports as concepts and settings instead of failing as 'not JSON'."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth import cli
from dreambooth.config.legacy import import_file, import_text
from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.store import Layout, ModelStore

DATASET = """
[general]
shuffle_caption = true
caption_extension = '.caption'
keep_tokens = 1
color_aug = false

[[datasets]]
resolution = 768
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'train/dog'
  class_tokens = 'sks dog'
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = '{absolute}'
  class_tokens = 'ohwx cat'
  num_repeats = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg/dog'
  class_tokens = 'dog'
  num_repeats = 1
"""


def write_dataset(tmp_path: Path, encoding: str = "utf-8") -> Path:
    path = tmp_path / "sets" / "dataset.toml"
    path.parent.mkdir(parents=True)
    path.write_bytes(DATASET.format(absolute=(tmp_path / "cats").as_posix()).encode(encoding))
    return path


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_subsets_become_concepts_with_repeats_tokens_and_class_folders(tmp_path: Path, encoding: str) -> None:
    base = TrainingConfig(learning_rate=3e-6, concepts=[Concept(instance_data_dir="/old")])
    result = import_file(write_dataset(tmp_path, encoding), base=base)
    config = result.config
    dog, cat = config.concepts
    assert (dog.instance_data_dir, dog.instance_token, dog.class_token, dog.repeats) == (
        str(tmp_path / "sets" / "train" / "dog"), "sks", "dog", 10)
    assert (dog.class_data_dir, dog.class_prompt) == (str(tmp_path / "sets" / "reg" / "dog"), "dog")
    assert (cat.instance_data_dir, cat.instance_token, cat.class_token, cat.repeats) == (str(tmp_path / "cats"),
                                                                                          "ohwx", "cat", 3)
    assert cat.class_data_dir == ""  # the only reg subset is of dogs
    assert (config.resolution, config.train_batch_size, config.caption_extension, config.shuffle_tags,
            config.keep_tokens) == (768, 2, ".caption", True, 1)
    assert config.learning_rate == 3e-6  # settings the file does not name are kept
    assert any("color_aug" in m and "ignored" in m for m in result.messages)
    assert any("replacing the model's 1" in m for m in result.messages)


def test_pasted_toml_and_broken_toml_get_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kohya dataset config \\(TOML\\), not JSON"):
        import_text(DATASET, "pasted JSON")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[datasets]\nx = ")
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML"):
        import_file(broken)
    empty = tmp_path / "empty.toml"
    empty.write_text("[general]\nshuffle_caption = true\n")
    with pytest.raises(ConfigError, match="no \\[\\[datasets\\]\\] table"):
        import_file(empty)


def test_cli_config_import_reads_a_dataset_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ModelStore(Layout.under(tmp_path / "data" / "models").ensure())
    store.model("dog").save_config(TrainingConfig())
    path = write_dataset(tmp_path)
    assert cli.main(["--data-dir", str(tmp_path / "data"), "config", "--name", "dog", "--import", str(path)]) == 0
    assert "color_aug" in capsys.readouterr().err
    assert [c.repeats for c in store.existing("dog").load_config().concepts] == [10, 3]
