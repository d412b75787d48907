"""The streamed safetensors reader and writer the checkpoint merge uses: files safetensors itself reads back with
the same tensors and metadata, tensors read one at a time equal the library's, and damaged files are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.errors import ModelError
from dreambooth.loratools.safetensors_stream import (
    FLOAT_DTYPES,
    check_stored,
    copy_bytes,
    read_header,
    read_tensor,
    write_streamed,
)


def sample(path: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
               "b.scale": torch.randn(7, generator=generator),
               "c.fp8": torch.randn(4, 4, generator=generator).to(torch.float8_e4m3fn),
               "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e.empty": torch.zeros(0, 4),
               "f.half": torch.randn(2, 2, generator=generator).half(), "g.flag": torch.tensor([True, False])}
    save_file(tensors, str(path), metadata={"k": "v"})
    return tensors


def test_read_and_copy_give_the_library_s_tensors_and_bytes(tmp_path: Path) -> None:
    source = tmp_path / "source.safetensors"
    tensors = sample(source)
    entries, metadata = read_header(source)
    check_stored(entries, source)
    assert metadata == {"k": "v"} and {entry.key for entry in entries} == set(tensors)
    with open(source, "rb") as handle:
        for entry in entries:
            if entry.dtype in FLOAT_DTYPES:
                assert torch.equal(read_tensor(handle, entry), tensors[entry.key])

        def write_one(index: int, out: object) -> None:
            copy_bytes(handle, entries[index], out)  # type: ignore[arg-type]

        write_streamed(tmp_path / "copy.safetensors", entries, write_one, {"k": "v", "added": "yes"})
    copied = load_file(str(tmp_path / "copy.safetensors"))
    assert copied.keys() == tensors.keys()
    for key, value in tensors.items():
        assert copied[key].dtype == value.dtype and torch.equal(copied[key].view(torch.uint8), value.view(torch.uint8))
    with safe_open(str(tmp_path / "copy.safetensors"), "pt") as handle:
        assert handle.metadata() == {"k": "v", "added": "yes"}


def test_a_writer_that_writes_the_wrong_size_leaves_no_file(tmp_path: Path) -> None:
    source = tmp_path / "source.safetensors"
    sample(source)
    entries, _ = read_header(source)
    with pytest.raises(ModelError, match="bytes written"):
        write_streamed(tmp_path / "out.safetensors", entries, lambda index, out: out.write(b"x"), {})
    assert not (tmp_path / "out.safetensors").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "source.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_file_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    source = tmp_path / "source.safetensors"
    sample(source)
    raw = source.read_bytes()
    source.write_bytes(raw[:-10] if damage == "truncated" else raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(ModelError, match="damaged or incomplete"):
        check_stored(read_header(source)[0], source)
