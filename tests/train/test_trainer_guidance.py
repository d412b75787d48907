"""The trainer shows the memory estimate before a run and warns when it/s collapses during one."""

from __future__ import annotations

from typing import Any

from dreambooth.train import meters
from dreambooth.train import trainer as trainer_module
from dreambooth.train.events import TrainCallbacks


class Messages(TrainCallbacks):
    def __init__(self) -> None:
        self.status: list[str] = []
        self.warnings: list[str] = []

    def on_status(self, text: str) -> None:
        self.status.append(text)

    def on_warning(self, text: str) -> None:
        self.warnings.append(text)


def test_memory_estimate_shown_and_warns_when_device_too_small(env: Any, monkeypatch: Any) -> None:
    messages = Messages()
    env.trainer(messages, max_train_steps=1).run()
    assert any(text.startswith("Estimated memory for this run:") for text in messages.status)
    assert not any("exceeds the device" in text for text in messages.warnings)

    env.fresh()
    monkeypatch.setattr(trainer_module, "device_memory_bytes", lambda device: 1024)
    small = Messages()
    env.trainer(small, max_train_steps=1, resume=False).run()
    assert any("exceeds the device" in text for text in small.warnings)


def test_collapsing_speed_warns_once(env: Any, monkeypatch: Any) -> None:
    speed_collapses_after_three_steps(monkeypatch)
    monkeypatch.setattr(meters, "ItSlowdownMonitor", _monitor)
    monkeypatch.setattr(meters, "watches_speed", lambda device: True)
    messages = Messages()
    env.trainer(messages, max_train_steps=6).run()
    slow = [text for text in messages.warnings if "it/s" in text or "slow" in text.lower()]
    assert len(slow) == 1


def speed_collapses_after_three_steps(monkeypatch: Any) -> None:
    rates = iter([10.0] * 3 + [1.0] * 50)

    class FastThenSlow(meters.StepMeter):
        def step_rate(self) -> float:
            return next(rates)

    monkeypatch.setattr(meters, "StepMeter", FastThenSlow)


def _monitor() -> Any:
    from dreambooth.guide.memory import ItSlowdownMonitor

    return ItSlowdownMonitor(warmup_steps=2, sustain=2)


def test_cpu_runs_do_not_watch_for_vram_spills(env: Any, monkeypatch: Any) -> None:
    speed_collapses_after_three_steps(monkeypatch)
    monkeypatch.setattr(meters, "ItSlowdownMonitor", _monitor)
    messages = Messages()
    env.trainer(messages, max_train_steps=6).run()
    assert not [text for text in messages.warnings if "slow" in text.lower()]
