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


def test_captions_are_encoded_before_the_denoiser_is_prepared(sdxl_env: Any, monkeypatch: Any) -> None:
    """The cache fills while the denoiser is still as loaded (no LoRA layers, not yet moved or cast), so the text
    encoders and the denoiser are never on the device together."""
    adapted_when_encoding: list[bool] = []
    encode_ahead = textcache.encode_ahead

    def spy(components: Any, *args: Any) -> Any:
        adapted_when_encoding.append(any("lora_A" in name for name, _ in components.denoiser.named_modules()))
        return encode_ahead(components, *args)

    monkeypatch.setattr(textcache, "encode_ahead", spy)
    trainer = sdxl_env.trainer(method="lora", train_text_encoder=False, cache_text_encoder_outputs="on",
                               max_train_steps=1, save_on_end=False)
    session, _ = trainer.setup()
    assert adapted_when_encoding == [False]
    assert any("lora_A" in name for name, _ in session.components.denoiser.named_modules())


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
    return SimpleNamespace(device=torch.device(device), text_cache={} if cached else None,
                           components=SimpleNamespace(text_encoders=encoders, present_text_encoders=lambda: encoders))


def test_plan_captions_are_each_caption_once_in_order() -> None:
    records = [SimpleNamespace(caption=caption) for caption in ("a", "b", "a", "c")]
    plan = SimpleNamespace(instance=records[:2], class_images=records[2:3], validation=records[3:])
    assert textcache.plan_captions(plan) == ["a", "b", "c"]


class Family:
    """Records what the encoders held while each caption was encoded."""

    def __init__(self, encoders: list[Encoder]) -> None:
        self.encoders = encoders
        self.seen: list[tuple[str, list[str]]] = []

    def encode_text(self, encoders: Any, tokenizers: Any, captions: list[str], *rest: Any) -> Any:
        self.seen.append((captions[0], [encoder.where for encoder in self.encoders]))
        return SimpleNamespace(hidden=torch.ones(1, 3, 2), pooled=None)


def test_captions_are_encoded_on_the_device_then_the_encoders_leave_it(monkeypatch: Any) -> None:
    monkeypatch.setattr("dreambooth.train.runtime.cast_module", lambda module, dtype, device, trained: module.to(device))
    encoders = [Encoder(), Encoder()]
    family = Family(encoders)
    components = SimpleNamespace(text_encoders=encoders, present_text_encoders=lambda: encoders, tokenizers=[],
                                 model_family=family)
    config = SimpleNamespace(mixed_precision="no")
    cache = textcache.encode_ahead(components, config, ["a", "b"], torch.device("cuda"), print)
    assert family.seen == [("a", ["cuda", "cuda"]), ("b", ["cuda", "cuda"])]
    assert set(cache) == {"a", "b"} and cache["a"][1] is None and cache["a"][0].shape == (3, 2)
    assert [encoder.moves for encoder in encoders] == [["cuda", "cpu"]] * 2


def test_encoders_come_back_for_previews_only(monkeypatch: Any) -> None:
    session = fake_session("cuda", cached=True)
    for encoder in session.components.text_encoders:
        encoder.where = "cpu"
    with textcache.encoders_on_device(session):
        assert all(encoder.where == "cuda" for encoder in session.components.text_encoders)
    assert [encoder.moves for encoder in session.components.text_encoders] == [["cuda", "cpu"]] * 2


def test_nothing_moves_on_the_cpu(monkeypatch: Any) -> None:
    session = fake_session("cpu", cached=True)
    with textcache.encoders_on_device(session):
        pass
    assert all(encoder.moves == [] for encoder in session.components.text_encoders)
