"""The host protocol: what the trainer and the tab need from a web UI (or from the embedded default host).

Implementations: `embedded.EmbeddedHost` (diffusers over a local folder) and `webui` (A1111, Forge, SD.Next;
the only module that imports the host's `modules.*`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..generation import GenerationRequest
from ..store import Layout

__all__ = ["GenerationRequest", "Host", "NullHostMixin"]


@runtime_checkable
class Host(Protocol):
    name: str
    layout: Layout

    def list_checkpoints(self) -> list[Path]:
        """Checkpoint files the host offers, refreshed from disk."""

    def refresh_checkpoints(self) -> None:
        """Make newly written checkpoints appear in the host's dropdown."""

    def refresh_loras(self) -> None:
        """Make newly written LoRAs appear in the host's LoRA cards."""

    def generate(self, request: GenerationRequest) -> list[Any]:
        """Render `request.count` PIL images through the host's txt2img pipeline."""

    def release_model(self) -> None:
        """Free the host's loaded model from GPU/RAM before training."""

    def restore_model(self) -> None:
        """Reload what release_model freed."""

    def interrupted(self) -> bool:
        """True when the host's own interrupt/skip button was pressed."""

    def progress(self, fraction: float, text: str) -> None:
        """Report progress on the host's own progress bar."""

    def gpu_lock(self) -> contextlib.AbstractContextManager[Any]:
        """The host's GPU queue; hold it while training or generating."""

    def config_defaults(self) -> dict[str, Any]:
        """Settings (schema name -> value) the host's own settings give newly created models; may be empty."""


class NullHostMixin:
    """No-op defaults for hosts that have no such concept."""

    def refresh_checkpoints(self) -> None:
        return None

    def refresh_loras(self) -> None:
        return None

    def release_model(self) -> None:
        return None

    def restore_model(self) -> None:
        return None

    def interrupted(self) -> bool:
        return False

    def progress(self, fraction: float, text: str) -> None:
        return None

    @contextlib.contextmanager
    def gpu_lock(self) -> Iterator[None]:
        yield None

    def config_defaults(self) -> dict[str, Any]:
        return {}
