"""Nested training state (optimizer, scheduler, EMA, scaler, RNG) as tensors plus JSON, never as a pickle.

`flatten(tree)` splits a nested value of dicts, lists, tuples, tensors and plain scalars into a flat
`{name: tensor}` dict (for safetensors) and a JSON-able structure that records everything else, including
what pickle would have kept for free: tuple versus list, and int versus str dict keys (optimizer state
dicts are keyed by parameter index). `unflatten(tensors, structure)` rebuilds an equal value. Reading the
files back runs no code: safetensors holds only tensors and the structure is parsed by `json`.

Structure format: str, int, bool and None stay as themselves; a float is `{"float": repr}` (keeps NaN,
infinity and -0.0 exact); containers are `{"dict": [[key, value], ...]}`, `{"list": [...]}` and
`{"tuple": [...]}`; a tensor is `{"tensor": name}`, with `"stride"` when it is laid out other than
contiguously (channels_last), so it is read back in the same layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch

FORMAT_VERSION = 1
_TAGS = ("float", "dict", "list", "tuple", "tensor")


class StateFormatError(ValueError):
    """A value that cannot be stored as tensors plus JSON, or a structure that does not describe one."""


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, structure) of `tree`; the tensors are the tree's own (move them to the CPU to save them)."""
    encoder = _Encoder()
    return encoder.tensors, encoder.encode(tree, "state")


def unflatten(tensors: dict[str, torch.Tensor], structure: Any) -> Any:
    """The value `flatten` was given, rebuilt from its tensors and structure."""
    return _decode(structure, tensors, "state")


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}  # id(tensor) -> name: one tensor reached twice is stored once

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)  # an int subclass (IntEnum) is stored as its value
        if isinstance(value, float):
            return {"float": _float_text(float(value))}
        if isinstance(value, torch.Tensor):
            layout = _dense_strides(value)
            return {"tensor": self._tensor(value), **({"stride": layout} if layout else {})}
        if isinstance(value, dict):
            return {"dict": [[_key(k, where), self.encode(v, f"{where}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            items = [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return {"tuple" if isinstance(value, tuple) else "list": items}
        raise StateFormatError(f"{where}: a {type(value).__name__} cannot be stored as tensors and JSON.")

    def _tensor(self, tensor: torch.Tensor) -> str:
        name = self.names.get(id(tensor))
        if name is None:
            name = self.names[id(tensor)] = str(len(self.tensors))
            self.tensors[name] = tensor
        return name


def _dense_strides(tensor: torch.Tensor) -> list[int] | None:
    """The strides of a dense tensor in another memory layout (channels_last), to restore it on reading.

    Files hold tensors contiguously; an optimizer state laid out unlike its parameter makes fused kernels,
    which walk both as flat memory, pair the wrong elements.
    """
    if tensor.is_contiguous():
        return None
    dims = sorted(range(tensor.dim()), key=lambda d: tensor.stride(d))
    expected = 1
    for dim in dims:
        if tensor.size(dim) > 1 and tensor.stride(dim) != expected:
            return None  # a view with gaps or overlaps: stored (and read back) contiguously
        expected *= tensor.size(dim)
    return list(tensor.stride())


def _key(key: Any, where: str) -> str | int:
    if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return key if isinstance(key, str) else int(key)
    raise StateFormatError(f"{where}: dict key {key!r} is neither a str nor an int.")


def _float_text(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return repr(value)  # repr round-trips exactly, including 'inf', '-inf' and '-0.0'


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if node is None or isinstance(node, (bool, str, int)):
        return node
    if not (isinstance(node, dict) and node and next(iter(node)) in _TAGS):
        raise StateFormatError(f"{where}: {str(node)[:80]!r} is not a stored value.")
    tag, body = next(iter(node.items()))
    if tag == "float":
        return float(body)
    if tag == "tensor":
        return _decode_tensor(node, tensors, where)
    if tag == "dict":
        return {_decode_key(k, where): _decode(v, tensors, f"{where}.{k}") for k, v in _pairs(body, where)}
    items = [_decode(item, tensors, f"{where}[{i}]") for i, item in enumerate(_items(body, where))]
    return tuple(items) if tag == "tuple" else items


def _decode_tensor(node: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    name, stride = node["tensor"], node.get("stride")
    if not isinstance(name, str) or name not in tensors:
        raise StateFormatError(f"{where}: tensor {name!r} is missing.")
    tensor = tensors[name]
    if stride is None:
        return tensor
    if not (isinstance(stride, list) and len(stride) == tensor.dim() and all(isinstance(s, int) for s in stride)):
        raise StateFormatError(f"{where}: stride {stride!r} does not fit tensor {name!r}.")
    return torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def _pairs(body: Any, where: str) -> list[tuple[Any, Any]]:
    if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
        raise StateFormatError(f"{where}: a stored dict must be a list of [key, value] pairs.")
    return [(key, value) for key, value in body]


def _decode_key(key: Any, where: str) -> str | int:
    if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return key
    raise StateFormatError(f"{where}: dict key {key!r} is neither a str nor an int.")


def _items(body: Any, where: str) -> list[Any]:
    if not isinstance(body, list):
        raise StateFormatError(f"{where}: a stored list must be a JSON list.")
    return body
