"""Files written by Windows tools (UTF-16 from PowerShell, UTF-8 with a mark from Notepad) read like UTF-8."""

from __future__ import annotations

import json

import pytest

from dreambooth.config import io
from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.textfiles import decode_text, encoding_of
from dreambooth.train.data.captions import read_caption

TEXT = '{"learning_rate": 2e-06, "concepts": [{"instance_prompt": "photo of sks café"}]}'
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]


def encoded(text: str, encoding: str) -> bytes:
    """As the tool writes it: 'utf-16' and 'utf-32' with a byte-order mark; utf-16-be with one added."""
    return ("\ufeff" + text).encode(encoding) if encoding == "utf-16-be" else text.encode(encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_windows_encoding_decodes_to_the_same_text(encoding):
    assert decode_text(encoded(TEXT, encoding)) == TEXT


def test_plain_utf8_is_not_mistaken_for_utf16():
    assert encoding_of("a\u00e9b".encode()) == "utf-8"
    assert encoding_of(b"ab") == "utf-8"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_config_written_by_powershell_loads(tmp_path, encoding):
    config = TrainingConfig(learning_rate=2e-6, concepts=[Concept(instance_prompt="photo of sks café")])
    path = tmp_path / "db_config.json"
    path.write_bytes(json.dumps(io.to_dict(config)).encode(encoding))
    loaded = io.load(path)
    assert loaded.learning_rate == 2e-6 and loaded.concepts[0].instance_prompt == "photo of sks café"


def test_utf16_caption_reads_without_a_warning(tmp_path):
    path = tmp_path / "img.txt"
    path.write_bytes("sks dog, café\r\non a beach".encode("utf-16"))
    assert read_caption(path) == ("sks dog, café, on a beach", None)
