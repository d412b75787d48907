"""Text-encoder outputs cached before the first step; the encoders wait on the CPU while an accelerator trains."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from dreambooth.train import textcache
from dreambooth.train.events import TrainObserver


class CacheAtStart(TrainObserver):
    def __init__(self) -> None:
        self.at_start: set[str] | None = None
        self.session: Any = None

    def on_session(self, session: Any) -> None:
        self.session = session
        self.at_start = set(session.text_cache) if session.text_cache is not None else None


def test_every_caption_is_encoded_before_the_first_step(sdxl_env: Any) -> None:
    """The cache holds every caption of the dataset (instance, class) when training starts, and training
    adds none: the text encoders are not needed again until a preview."""
    spy = CacheAtStart()
    result = sdxl_env.trainer(observers=[spy], train_text_encoder=False, cache_text_encoder_outputs="on",
                              max_train_steps=3, save_on_end=False).run()
    assert result.completed
    expected = {record.caption for record in [*spy.session.plan.instance, *spy.session.plan.class_images]}
    assert spy.at_start == expected and len(expected) >= 2
    assert set(spy.session.text_cache) == expected
    hidden, pooled = spy.session.text_cache[next(iter(expected))]
    assert hidden.dim() == 2 and pooled is not None  # SDXL: the second encoder's pooled output too


def test_without_caching_nothing_is_encoded_ahead(sdxl_env: Any) -> None:
    spy = CacheAtStart()
    assert sdxl_env.trainer(observers=[spy], cache_text_encoder_outputs="off", max_train_steps=1,
                            save_on_end=False).run().completed
    assert spy.at_start is None


class Encoder(torch.nn.Linear):
    """A module whose moves are recorded (no accelerator here: `to` only records the device asked for)."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.moves: list[str] = []
        self.where = "cpu"

    def to(self, device: Any, *args: Any, **kwargs: Any) -> Encoder:  # type: ignore[override]
        self.where = torch.device(device).type
        self.moves.append(self.where)
        return self

    def parameters(self, recurse: bool = True) -> Any:  # type: ignore[override]
        yield SimpleNamespace(device=torch.device(self.where))


def fake_session(device: str, cached: bool) -> Any:
    encoders = [Encoder(), Encoder()]
    for encoder in encoders:
        encoder.where = torch.device(device).type
    records = [SimpleNamespace(caption=caption) for caption in ("a", "b", "a")]
    plan = SimpleNamespace(instance=records[:2], class_images=records[2:], validation=[])
    return SimpleNamespace(device=torch.device(device), text_cache={} if cached else None, plan=plan,
                           components=SimpleNamespace(text_encoders=encoders, present_text_encoders=lambda: encoders), config=SimpleNamespace(mixed_precision="no"))


def test_encoders_move_to_the_cpu_after_the_cache_and_back_for_previews(monkeypatch: Any) -> None:
    encoded: list[list[str]] = []
    monkeypatch.setattr("dreambooth.train.objectives.encode_text", lambda session, captions: encoded.append(captions))
    session = fake_session("cuda", cached=True)
    assert textcache.plan_captions(session) == ["a", "b"]
    assert textcache.fill_and_offload(session) == 2
    assert encoded == [["a"], ["b"]]
    assert [encoder.moves for encoder in session.components.text_encoders] == [["cpu"], ["cpu"]]
    with textcache.encoders_on_device(session):
        assert all(encoder.where == "cuda" for encoder in session.components.text_encoders)
    assert [encoder.moves for encoder in session.components.text_encoders] == [["cpu", "cuda", "cpu"]] * 2


def test_nothing_moves_on_the_cpu_or_without_the_cache(monkeypatch: Any) -> None:
    monkeypatch.setattr("dreambooth.train.objectives.encode_text", lambda session, captions: None)
    for session in (fake_session("cpu", cached=True), fake_session("cuda", cached=False)):
        assert textcache.fill_and_offload(session) == 0
        with textcache.encoders_on_device(session):
            pass
        assert all(encoder.moves == [] for encoder in session.components.text_encoders)
