from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth.models.tokenizer import (
    TOKENIZER_DIR,
    build_clip_vocab,
    load_clip_tokenizer,
    open_clip_vocab_path,
    write_tokenizer_folder,
)


def test_token_ids_match_openai_clip() -> None:
    tokenizer = load_clip_tokenizer()
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token_id == 49407


def test_open_clip_tokenizer_pads_with_exclamation_mark() -> None:
    tokenizer = load_clip_tokenizer(pad_token="!")
    ids = tokenizer("sks dog", padding="max_length", max_length=8).input_ids
    assert ids == [49406, 48136, 1929, 49407, 0, 0, 0, 0]


def test_tokenizer_folder_keeps_pad_token(tmp_path: Path) -> None:
    from dreambooth.models.tokenizer import load_tokenizer_folder

    write_tokenizer_folder(tmp_path / "tokenizer_2", pad_token="!")
    assert load_tokenizer_folder(tmp_path / "tokenizer_2").pad_token == "!"


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                    reason="needs open_clip_torch's BPE file; tools/setup.sh installs it with --no-deps (the test "
                           "extra leaves it out: pip would add a torchvision that breaks diffusers on CPU)")
def test_shipped_files_are_rebuilt_byte_for_byte(tmp_path: Path) -> None:
    build_clip_vocab(open_clip_vocab_path(), tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes()
    # The sizes of openai/clip-vit-large-patch14's files.
    assert (tmp_path / "vocab.json").stat().st_size == 961143
    assert (tmp_path / "merges.txt").stat().st_size == 524619


# --- T5 (offline: the model folder, then the host's folders) --------------------------------------------------

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dreambooth.models.tiny import tiny_t5_tokenizer_dir

    pytest.importorskip("sentencepiece")
    found = tiny_t5_tokenizer_dir(tmp_path_factory.mktemp("t5") / "tokenizer_3")
    assert found is not None
    return found


T5_SPEC = SimpleNamespace(tokenizer_folder="tokenizer_3")


def test_t5_ids_are_what_the_pipelines_feed(t5_dir: Path) -> None:
    """Padded to the fixed length with the end token, cut when longer: as the SD3/Flux pipelines tokenize."""
    from dreambooth.families.t5_text import t5_ids
    from dreambooth.models.tokenizer import read_t5_tokenizer

    tokenizer = read_t5_tokenizer(t5_dir)
    captions = ["sks dog", "sks dog wearing a blue hat in the snow " * 4]
    warnings: list[str] = []
    ids = t5_ids(tokenizer, captions, 16, warnings.append)
    expected = tokenizer(captions, padding="max_length", max_length=16, truncation=True,
                         add_special_tokens=True).input_ids
    assert ids.tolist() == expected
    assert len(warnings) == 1 and "16" in warnings[0]


def test_t5_tokenizer_is_found_in_the_model_folder_first(t5_dir: Path, tmp_path: Path) -> None:
    from dreambooth.models import tokenizer as tokenizers

    model = tmp_path / "model"
    (model / "tokenizer_3").mkdir(parents=True)
    assert tokenizers.load_t5_tokenizer(model, T5_SPEC) is None
    tokenizers.register_t5_tokenizer_dirs([t5_dir])
    try:
        assert tokenizers.load_t5_tokenizer(model, T5_SPEC).name_or_path == str(t5_dir)
        shutil.copy(t5_dir / "spiece.model", model / "spiece.model")
        assert tokenizers.load_t5_tokenizer(model, T5_SPEC).name_or_path == str(model)
        shutil.copy(t5_dir / "spiece.model", model / "tokenizer_3" / "spiece.model")
        assert tokenizers.load_t5_tokenizer(model, T5_SPEC).name_or_path == str(model / "tokenizer_3")
    finally:
        tokenizers.register_t5_tokenizer_dirs([])


def test_missing_t5_tokenizer_names_the_files_and_places(tmp_path: Path) -> None:
    from dreambooth.models.tokenizer import missing_t5_tokenizer, t5_search_dirs

    message = missing_t5_tokenizer(t5_search_dirs(tmp_path / "model", "tokenizer_3"))
    assert "tokenizer.json or spiece.model" in message
    assert str(tmp_path / "model" / "tokenizer_3") in message and "never downloaded" in message


def test_t5_tokenizer_json_and_spiece_give_the_same_ids(t5_dir: Path, tmp_path: Path) -> None:
    """A copied tokenizer keeps its files; a tokenizer.json (fast) reads as its spiece.model does."""
    from dreambooth.models.tokenizer import copy_t5_tokenizer, read_t5_tokenizer

    slow = read_t5_tokenizer(t5_dir)
    copied = copy_t5_tokenizer(slow, tmp_path / "copy")
    assert (copied / "spiece.model").read_bytes() == (t5_dir / "spiece.model").read_bytes()
    try:
        from transformers import T5TokenizerFast

        T5TokenizerFast.from_pretrained(str(t5_dir)).save_pretrained(str(tmp_path / "fast"))
    except ImportError as error:  # transformers 4 converts spiece.model to the fast format only with protobuf
        pytest.skip(f"no conversion to tokenizer.json here ({error})")
    (tmp_path / "fast" / "spiece.model").unlink(missing_ok=True)
    fast = read_t5_tokenizer(tmp_path / "fast")
    caption = "a red cat sitting on the moon"
    assert fast(caption).input_ids == slow(caption).input_ids
