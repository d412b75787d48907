"""Text-encoder outputs cached before the first step, and the encoders off the device until a preview needs them.

When a run caches text-encoder outputs (frozen encoders, fixed captions: config.schema.caches_text_outputs),
every caption of the dataset is encoded once while the models load, before the denoiser reaches the device,
exactly as the first step that met it would have (one caption at a time, under the run's autocast), and the
encoders then move to the CPU: SDXL's two encoders hold 1.6 GB in 16 bits that the denoiser's training can use
instead. Previews need them back on the device for
as long as they render.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from . import runtime

if TYPE_CHECKING:
    from .session import Session

OFFLOAD_DEVICE = torch.device("cpu")
# A caption's encoder outputs: the hidden states and, for families with one, the pooled embedding.
CachedText = tuple[torch.Tensor, torch.Tensor | None]


def plan_captions(plan: Any) -> list[str]:
    """Every caption the run encodes: with cached outputs captions are fixed, one per image record."""
    records = [*plan.instance, *plan.class_images, *plan.validation]
    return list(dict.fromkeys(record.caption for record in records))


def _offloaded(session: Session) -> list[torch.nn.Module]:
    """The text encoders that sit on the CPU while the run trains on an accelerator."""
    if session.device.type == OFFLOAD_DEVICE.type:
        return []
    return [encoder for encoder in session.components.present_text_encoders()
            if next(encoder.parameters()).device.type == OFFLOAD_DEVICE.type]


def cache_entry(encoded: Any) -> CachedText:
    """One caption's row of the text cache (the batch of one taken apart)."""
    return encoded.hidden[0], None if encoded.pooled is None else encoded.pooled[0]


def encode_ahead(components: Any, config: Any, captions: list[str], device: torch.device,
                 warn: Callable[[str], None]) -> dict[str, CachedText]:
    """Encode every caption with the text encoders alone on the device, then move them to the CPU.

    It runs before the denoiser reaches the device, so the run's peak is the larger of the two rather than
    their sum (Flux's and SD3's T5-XXL alone is 9.5 GB in 16 bits). Each caption is encoded as the first step
    that met it would have: one at a time, frozen weights in the compute dtype, under the run's autocast."""
    encoders = components.present_text_encoders()
    for encoder in encoders:
        runtime.cast_module(encoder, runtime.compute_dtype(config), device, trained=set())
    cache: dict[str, CachedText] = {}
    with torch.no_grad(), runtime.autocast(config, device):
        for caption in captions:
            cache[caption] = cache_entry(components.model_family.encode_text(
                components.text_encoders, components.tokenizers, [caption], config, device, warn))
    if device.type != OFFLOAD_DEVICE.type:
        for encoder in encoders:
            encoder.to(OFFLOAD_DEVICE)
    return cache


@contextlib.contextmanager
def encoders_on_device(session: Session) -> Iterator[None]:
    """The text encoders on the run's device for the duration (previews), back on the CPU after."""
    moved = _offloaded(session)
    for encoder in moved:
        encoder.to(session.device)
    try:
        yield
    finally:
        for encoder in moved:
            encoder.to(OFFLOAD_DEVICE)
