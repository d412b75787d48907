"""A fake host for tests: draws flat colour images from the seed and records every call.

Implements the whole Host protocol without torch, diffusers or a web UI, so the service, the API and
the tab can be tested quickly. Image i of a request has the colour derived from seed + i.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dreambooth.generation import GenerationRequest
from dreambooth.host.embedded import find_checkpoints
from dreambooth.store import Layout


def seed_colour(seed: int) -> tuple[int, int, int]:
    """A colour that differs for neighbouring seeds (so tests can tell images apart)."""
    return (seed * 97) % 256, (seed * 57 + 80) % 256, (seed * 31 + 160) % 256


class FakeHost:
    name = "fake"

    def __init__(self, layout: Layout, defaults: dict[str, Any] | None = None):
        self.layout = layout
        self.defaults = dict(defaults or {})
        self.calls: list[tuple[str, Any]] = []
        self.requests: list[GenerationRequest] = []
        self.released = False
        self.interrupt_flag = False
        self.progress_reports: list[tuple[float, str]] = []
        self._lock = threading.RLock()

    def _record(self, name: str, argument: Any = None) -> None:
        self.calls.append((name, argument))

    def call_names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def list_checkpoints(self) -> list[Path]:
        self._record("list_checkpoints")
        return find_checkpoints(self.layout.checkpoints_dir)

    def refresh_checkpoints(self) -> None:
        self._record("refresh_checkpoints")

    def refresh_loras(self) -> None:
        self._record("refresh_loras")

    def generate(self, request: GenerationRequest) -> list[Any]:
        from PIL import Image

        self._record("generate", request)
        self.requests.append(request)
        return [Image.new("RGB", (request.width, request.height), seed_colour(request.seed + i))
                for i in range(request.count)]

    def release_model(self) -> None:
        self._record("release_model")
        self.released = True

    def restore_model(self) -> None:
        self._record("restore_model")
        self.released = False

    def interrupted(self) -> bool:
        return self.interrupt_flag

    def progress(self, fraction: float, text: str) -> None:
        self.progress_reports.append((fraction, text))

    @contextlib.contextmanager
    def gpu_lock(self) -> Iterator[None]:
        with self._lock:
            self._record("gpu_lock")
            yield None

    def config_defaults(self) -> dict[str, Any]:
        return dict(self.defaults)
