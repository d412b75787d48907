"""Observers tests use to look at a run's session after it ended (the trainer drops it before the host's model is
loaded back)."""

from __future__ import annotations

from typing import Any

from dreambooth.train.events import TrainObserver


class SessionSpy(TrainObserver):
    def __init__(self) -> None:
        self.session: Any = None

    def on_session(self, session: Any) -> None:
        self.session = session
