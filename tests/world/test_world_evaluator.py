"""The evaluator reads held-out world pictures right: drawn ones, their VAE round trips, and shapeless ones.

The pictures come from a generator seed the build never used. The bounds are the accuracies the README
states for the evaluator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from dreambooth.world.evaluator import Judgement, appearance, load_evaluator, pixels_of, rate, total_variation
from dreambooth.world.scenes import ALL_COLOURS, SUBJECT, Scene, draw, random_scene

HELD_OUT_SEED = 1000
COUNT = 160


@pytest.fixture(scope="module")
def held_out() -> list[Scene]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    return [random_scene(rng, tuple(ALL_COLOURS), dot_rate=0.5) for _ in range(COUNT)]


@pytest.fixture(scope="module")
def world_vae(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from dreambooth.models.loading import load_checkpoint
    from dreambooth.world.model import write_world_checkpoint

    return load_checkpoint(write_world_checkpoint(tmp_path_factory.mktemp("world") / "world.safetensors")).vae


def accuracy(judged: list[Judgement], scenes: list[Scene]) -> dict[str, float]:
    pairs = list(zip(judged, scenes, strict=True))
    return {"shape": np.mean([j.shape == s.shape for j, s in pairs]),
            "colour": np.mean([j.colour == s.colour for j, s in pairs]),
            "background": np.mean([j.background == s.background for j, s in pairs]),
            "dot": np.mean([j.dot == s.dot for j, s in pairs])}


def test_drawn_pictures_are_read_right(held_out: list[Scene]) -> None:
    scores = accuracy(load_evaluator().judge([draw(scene) for scene in held_out]), held_out)
    assert min(scores.values()) >= 0.97, scores


def test_vae_round_trips_are_read_right(held_out: list[Scene], world_vae: Any) -> None:
    with torch.no_grad():
        latents = world_vae.encode(pixels_of([draw(scene) for scene in held_out])).latent_dist.mean
        decoded = world_vae.decode(latents).sample.clamp(-1, 1)
    images = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scores = accuracy(load_evaluator().judge(list(images)), held_out)
    assert min(scores.values()) >= 0.95, scores


def test_noise_and_plain_backgrounds_are_no_shape() -> None:
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(20)]
    plain = [np.full((64, 64, 3), rng.integers(0, 256, 3), dtype=np.uint8) for _ in range(20)]
    judged = load_evaluator().judge(noise + plain)
    assert sum(j.recognised for j in judged) <= 2


def test_measures_over_judgements() -> None:
    def seen(colour: str, dot: bool, shape: str = "circle") -> Judgement:
        return Judgement(shape=shape, colour=colour, background="grey", dot=dot, confidence=0.9)

    subject, red, blob = seen(SUBJECT.colour, True), seen("red", False), seen("red", False, "none")
    assert rate([subject, red, subject, blob]) == 0.5 and SUBJECT.dot and SUBJECT.shape == "circle"
    assert appearance([subject, red, blob]) == {f"{SUBJECT.colour}+dot": 0.5, "red": 0.5}
    assert total_variation({"red": 1.0}, {"red": 1.0}) == 0.0
    assert total_variation({"red": 1.0}, {"orange+dot": 1.0}) == 1.0
    assert total_variation({"red": 0.5, "blue": 0.5}, {"red": 1.0}) == 0.5
