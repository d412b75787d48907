"""CLIP caption encoding as the web UI does at inference: 75-token chunks, clip skip, padding, pooling.

A caption longer than 75 tokens is split into chunks of 75, each wrapped in start/end tokens and encoded
separately, and the hidden states are concatenated (A1111's long-prompt handling); `max_token_length`
(75/150/225) caps the chunks, longer captions are truncated with a warning. The families choose which
layer conditions the UNet (`final_hidden` for SD1/SD2, `penultimate_hidden` for SDXL).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

CHUNK = 75
# (encoder, ids, clip_skip) -> (hidden states, pooled output or None)
HiddenFn = Callable[[Any, torch.Tensor, int], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass
class EncodedText:
    hidden: torch.Tensor  # (B, tokens, width): the UNet's encoder_hidden_states
    pooled: torch.Tensor | None  # (B, width) for SDXL's added conditioning


def tokenize(tokenizer: Any, caption: str) -> list[int]:
    return list(tokenizer(caption, add_special_tokens=False, truncation=False).input_ids)


def truncate(tokens: list[int], max_tokens: int, caption: str, warn: Callable[[str], None]) -> list[int]:
    if len(tokens) <= max_tokens:
        return tokens
    warn(f"Caption has {len(tokens)} tokens, more than 'max_token_length' {max_tokens}; the rest is cut: "
         f"{caption[:60]!r}... Raise max_token_length to 150 or 225 to keep it.")
    return tokens[:max_tokens]


def chunk_count(token_lists: list[list[int]]) -> int:
    return max(1, max(math.ceil(len(tokens) / CHUNK) for tokens in token_lists))


def chunk_ids(tokens: list[int], chunks: int, length: int, tokenizer: Any) -> torch.Tensor:
    """(chunks, length+2) ids: each chunk is BOS + up to `length` tokens + EOS, padded with the pad token."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for index in range(chunks):
        part = tokens[index * CHUNK:(index + 1) * CHUNK]
        rows.append([bos, *part, eos] + [pad] * (length - len(part)))
    return torch.tensor(rows, dtype=torch.long)


def batch_ids(tokenizer: Any, captions: list[str], max_tokens: int, pad_full: bool,
              warn: Callable[[str], None]) -> torch.Tensor:
    """(B, chunks, length+2) ids. pad_full pads to whole 75-token chunks (the web UI), else to the longest."""
    token_lists = [truncate(tokenize(tokenizer, c), max_tokens, c, warn) for c in captions]
    chunks = chunk_count(token_lists)
    length = CHUNK if pad_full or chunks > 1 else max(len(t) for t in token_lists)
    return torch.stack([chunk_ids(tokens, chunks, length, tokenizer) for tokens in token_lists])


def final_layer_norm(encoder: Any) -> Any:
    """The encoder's last LayerNorm (transformers 4 nests it in .text_model, 5 does not; DDP in .module)."""
    model = getattr(encoder, "module", encoder)
    return getattr(model, "text_model", model).final_layer_norm


def final_hidden(encoder: Any, ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD1/SD2: the last layer, or with clip skip an earlier one through the final layer norm (as A1111)."""
    output = encoder(ids, output_hidden_states=True)
    if clip_skip <= 1:
        return output.last_hidden_state, None
    return final_layer_norm(encoder)(output.hidden_states[-clip_skip]), None


def penultimate_hidden(encoder: Any, ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDXL: the penultimate layer (clip skip 1) without the final layer norm, and the projected pooled output."""
    output = encoder(ids, output_hidden_states=True)
    return output.hidden_states[-(clip_skip + 1)], getattr(output, "text_embeds", None)


def encode_chunks(encoder: Any, ids: torch.Tensor, clip_skip: int,
                  hidden_fn: HiddenFn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode (B, chunks, L) ids: chunks go through the encoder as one batch, then are concatenated."""
    batch, chunks, length = ids.shape
    hidden, pooled = hidden_fn(encoder, ids.reshape(batch * chunks, length), clip_skip)
    hidden = hidden.reshape(batch, chunks * length, hidden.shape[-1])
    if pooled is not None:
        pooled = pooled.reshape(batch, chunks, -1)[:, 0]  # the first chunk's pooled output, as A1111
    return hidden, pooled


def encode_all(encoders: list[Any], tokenizers: list[Any], captions: list[str], config: Any,
               device: torch.device, warn: Callable[[str], None], hidden_fn: HiddenFn) -> EncodedText:
    """Every encoder's hidden states concatenated along the width; the last pooled output found."""
    hiddens, pooled = [], None
    for encoder, tokenizer in zip(encoders, tokenizers, strict=False):
        ids = batch_ids(tokenizer, captions, config.max_token_length, config.pad_tokens, warn).to(device)
        hidden, pooled_here = encode_chunks(encoder, ids, config.clip_skip, hidden_fn)
        hiddens.append(hidden)
        pooled = pooled_here if pooled_here is not None else pooled
    return EncodedText(torch.cat(hiddens, dim=-1) if len(hiddens) > 1 else hiddens[0], pooled)
