"""Reading and writing .safetensors files one tensor at a time, with plain file reads and writes.

safetensors' own reader maps the whole file into the process (a 24 GB Flux file counts as 24 GB resident while
it is read) and its writer needs every tensor in memory at once; rewriting a checkpoint with a few weights
changed needs neither. The format is small: an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and data offsets, and `__metadata__`), then the tensors' bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..atomic import atomic_path
from ..errors import ModelError

# Bytes per element of each safetensors dtype a checkpoint may hold (fp8 and 4-bit packs are copied as bytes).
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# The floating types read as tensors (a LoRA merges into them, the output precision applies to them).
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
COPY_CHUNK = 64 << 20
HEADER_LIMIT = 100 << 20  # larger headers are refused by safetensors too


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a file: key, safetensors dtype name, shape, and where its bytes are in the source file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int = 0
    stored: int = 0

    @property
    def nbytes(self) -> int:
        return ITEM_BYTES[self.dtype] * math.prod(self.shape)


def _damaged(path: Path, why: object) -> ModelError:
    return ModelError(f"{path} cannot be read ({why}); the file is damaged or incomplete - copy it again.")


def read_header(path: Path) -> tuple[list[FileTensor], dict[str, str]]:
    """The tensors (in the header's order) and metadata of a .safetensors file; no weight is read."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > HEADER_LIMIT:
                raise _damaged(path, f"a header of {length} bytes")
            header = json.loads(handle.read(length))
        metadata = dict(header.pop("__metadata__", None) or {})
        data = 8 + length
        tensors = [FileTensor(key, str(entry["dtype"]), tuple(int(n) for n in entry["shape"]),
                              data + int(entry["data_offsets"][0]),
                              int(entry["data_offsets"][1]) - int(entry["data_offsets"][0]))
                   for key, entry in header.items()]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as error:
        raise _damaged(path, error) from None
    return tensors, metadata


def check_stored(tensors: Sequence[FileTensor], path: Path) -> None:
    """Every tensor has a known type and the size its shape says, inside the file (before any byte is copied)."""
    size = path.stat().st_size
    for tensor in tensors:
        if tensor.dtype not in ITEM_BYTES:
            raise ModelError(f"{path.name}: tensor {tensor.key} has the storage type {tensor.dtype}, which this tool "
                             "cannot copy; use the bf16/fp16 version of the file.")
        if tensor.stored != tensor.nbytes or tensor.start < 0 or tensor.start + tensor.stored > size:
            raise _damaged(path, f"tensor {tensor.key} does not fit its place")


def read_tensor(handle: BinaryIO, tensor: FileTensor) -> torch.Tensor:
    """A floating tensor (FLOAT_DTYPES) read from the open source file."""
    if tensor.stored == 0:
        return torch.zeros(tensor.shape, dtype=FLOAT_DTYPES[tensor.dtype])
    handle.seek(tensor.start)
    data = bytearray(tensor.stored)
    if handle.readinto(data) != tensor.stored:
        raise ModelError(f"{tensor.key}: the file ended early; it is incomplete - copy it again.")
    return torch.frombuffer(data, dtype=FLOAT_DTYPES[tensor.dtype]).reshape(tensor.shape)


def copy_bytes(handle: BinaryIO, tensor: FileTensor, out: BinaryIO) -> None:
    """A tensor's bytes copied unchanged, in chunks."""
    handle.seek(tensor.start)
    left = tensor.stored
    while left > 0:
        chunk = handle.read(min(left, COPY_CHUNK))
        if not chunk:
            raise ModelError(f"{tensor.key}: the file ended early; it is incomplete - copy it again.")
        out.write(chunk)
        left -= len(chunk)


def write_tensor(out: BinaryIO, value: torch.Tensor) -> None:
    out.write(memoryview(value.contiguous().reshape(-1).view(torch.uint8).numpy()))


def write_streamed(target: Path, tensors: Sequence[FileTensor], write_one: Callable[[int, BinaryIO], None],
                   metadata: Mapping[str, str]) -> None:
    """A safetensors file written atomically, `write_one(index, out)` writing each tensor's bytes in turn (the
    header goes first: every tensor's type and shape are known before its bytes are)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for tensor in tensors:
        header[tensor.key] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                              "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format's 8-byte alignment of the data
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for index, tensor in enumerate(tensors):
            before = out.tell()
            write_one(index, out)
            if out.tell() - before != tensor.nbytes:
                raise ModelError(f"{tensor.key}: {out.tell() - before} bytes written, {tensor.nbytes} announced.")
