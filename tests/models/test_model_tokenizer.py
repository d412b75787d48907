from __future__ import annotations

import importlib.util
from pathlib import Path

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
