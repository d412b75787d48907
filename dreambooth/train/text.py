"""Caption encoding for training: the family units encode (dreambooth/families), this module keeps the
older entry points working.

`encode_captions(..., sdxl, ...)` encodes like SD1/SD2 (`sdxl=False`) or SDXL (`sdxl=True`); new code
calls `get_family(config.model_family).encode_text(...)` and `.added_conditioning(...)` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..families import get_family
from ..families.clip_text import (
    CHUNK,
    EncodedText,
    batch_ids,
    chunk_count,
    chunk_ids,
    encode_chunks,
    final_hidden,
    final_layer_norm,
    penultimate_hidden,
    tokenize,
    truncate,
)

Encoded = EncodedText


def encode_with(encoder: Any, ids: torch.Tensor, clip_skip: int, sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode (B, chunks, L) ids with SDXL's (penultimate layer, pooled) or SD1/SD2's layer choice."""
    return encode_chunks(encoder, ids, clip_skip, penultimate_hidden if sdxl else final_hidden)


def encode_captions(encoders: list[Any], tokenizers: list[Any], captions: list[str], config: Any, sdxl: bool,
                    device: torch.device, warn: Callable[[str], None]) -> EncodedText:
    """The captions encoded by the family of `config.model_family` (`sdxl` only where a config has none)."""
    name = getattr(config, "model_family", None) or ("sdxl" if sdxl else "sd1")
    return get_family(name).encode_text(encoders, tokenizers, captions, config, device, warn)


__all__ = ["CHUNK", "Encoded", "EncodedText", "batch_ids", "chunk_count", "chunk_ids", "encode_captions",
           "encode_with", "final_layer_norm", "tokenize", "truncate"]
