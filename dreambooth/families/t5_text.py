"""T5 caption encoding as the diffusers SD3 and Flux pipelines do: padded to a fixed length, no attention mask.

The pipelines tokenize with padding to `max_sequence_length` (SD3: 256 by default, Flux: 512), cut longer
captions, and use the encoder's last hidden state for every position. A cut caption is warned about once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def t5_ids(tokenizer: Any, captions: list[str], max_length: int, warn: Callable[[str], None]) -> torch.Tensor:
    """(B, max_length) ids: each caption with T5's end token, padded or cut to `max_length`."""
    rows = []
    for caption in captions:
        ids = list(tokenizer(caption, add_special_tokens=True, truncation=False).input_ids)
        if len(ids) > max_length:
            warn(f"Caption has {len(ids)} T5 tokens, more than the {max_length} the model reads; the rest is cut: "
                 f"{caption[:60]!r}...")
            ids = ids[:max_length - 1] + [tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (max_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def encode_t5(encoder: Any, tokenizer: Any, captions: list[str], max_length: int, device: torch.device,
              warn: Callable[[str], None]) -> torch.Tensor:
    """(B, max_length, width): the T5 encoder's last hidden state over the padded ids."""
    ids = t5_ids(tokenizer, captions, max_length, warn).to(device)
    return encoder(ids)[0]
