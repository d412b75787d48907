"""Text-encoder outputs cached before the first step, and the encoders off the device until a preview needs them.

When a run caches text-encoder outputs (frozen encoders, fixed captions: config.schema.caches_text_outputs),
every caption of the dataset is encoded once before training, exactly as the first step that met it would have
(one caption at a time, under the run's autocast), and the encoders then move to the CPU: SDXL's two encoders
hold 1.6 GB in 16 bits that the denoiser's training can use instead. Previews need them back on the device for
as long as they render.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from . import runtime

if TYPE_CHECKING:
    from .session import Session

OFFLOAD_DEVICE = torch.device("cpu")


def plan_captions(session: Session) -> list[str]:
    """Every caption the run encodes: with cached outputs captions are fixed, one per image record."""
    records = [*session.plan.instance, *session.plan.class_images, *session.plan.validation]
    return list(dict.fromkeys(record.caption for record in records))


def _offloaded(session: Session) -> list[torch.nn.Module]:
    """The text encoders that sit on the CPU while the run trains on an accelerator."""
    if session.device.type == OFFLOAD_DEVICE.type:
        return []
    return [encoder for encoder in session.components.present_text_encoders()
            if next(encoder.parameters()).device.type == OFFLOAD_DEVICE.type]


def fill_and_offload(session: Session) -> int:
    """Encode every caption into the run's text cache, then move the text encoders to the CPU.

    Returns the number of encoders moved (0 when the run does not cache text-encoder outputs, or trains on the
    CPU)."""
    from .objectives import encode_text

    if session.text_cache is None:
        return 0
    with torch.no_grad(), runtime.autocast(session.config, session.device):
        for caption in plan_captions(session):
            encode_text(session, [caption])
    if session.device.type == OFFLOAD_DEVICE.type:
        return 0
    for encoder in session.components.present_text_encoders():
        encoder.to(OFFLOAD_DEVICE)
    return len(session.components.present_text_encoders())


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
